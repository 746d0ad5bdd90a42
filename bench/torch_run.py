"""The PyTorch side of `bench.run --torch`: the same work as the JAX benchmarks, timed alike.

  python -m bench.torch_run --stages vqgan_ae,vqgan,flow --size 64 --batch 2 [--dtype bfloat16]

prints one JSON line per stage (`bench.run` starts it as a child process, so that no JAX
runtime runs beside PyTorch). Runs on CUDA when PyTorch sees a GPU, else on the CPU with all
cores. `dtype="bfloat16"` runs the forward and backward passes under `torch.autocast`
(parameters and optimizer state float32), PyTorch's counterpart of the JAX models' `dtype`.
On CUDA, cuDNN picks its fastest algorithm per shape (`cudnn.benchmark`) and float32 matrix
products and convolutions may use TF32 tensor cores, as XLA's defaults do on the JAX side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Callable

import torch

from bench import timing


def device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(out):
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return out


def timeit(fn: Callable[[], object], repeats: int) -> float:
  """`bench.timing.timeit` with PyTorch's device synchronisation."""
  return timing.timeit(fn, repeats, sync=_sync)


def _autocast(dtype: str):
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device().type, dtype=getattr(torch, dtype))


def bench_ae(size: int, batch: int, repeats: int, dtype: str) -> tuple[str, float]:
  """The thesis autoencoder's forward + backward of an L1 loss."""
  from bench.torch_models import ThesisAutoencoder  # pylint: disable=import-outside-toplevel

  model = ThesisAutoencoder().to(device())
  x = torch.rand(batch, 1, size, size, size, device=device()) * 2 - 1

  def step():
    model.zero_grad(set_to_none=True)
    with _autocast(dtype):
      loss = (model(x) - x).abs().mean()
    loss.backward()
    return loss.detach()

  return f"torch vqgan_ae fwd+bwd {size}^3 b{batch} {dtype}", timeit(step, repeats)


def bench_vqgan(size: int, batch: int, repeats: int, dtype: str) -> tuple[str, float]:
  """The full thesis VQ-GAN train step (`bench/torch_vqgan.py`)."""
  # pylint: disable=import-outside-toplevel
  from bench.torch_vqgan import VQGANTrainStep
  from experiments.configs.vqgan import get_config

  config = get_config("thesis")
  config.data.shape, config.optim.accumulate = (size,) * 3, 1
  step = VQGANTrainStep(config).to(device())
  images = torch.rand(batch, 1, size, size, size, device=device())

  def call():
    with _autocast(dtype):
      return step(images)

  return f"torch vqgan train step {size}^3 b{batch} {dtype}", timeit(call, repeats)


def bench_flow(latent: int, batch: int, repeats: int, dtype: str) -> tuple[str, float]:
  """The thesis UNet's train step (hybrid loss, clipping, AdamW) on a `latent`³ x 8 latent."""
  from bench.torch_models import FlowUNet3d  # pylint: disable=import-outside-toplevel

  model = FlowUNet3d().to(device())  # the thesis UNet (37,910,568 parameters), dropout 0.5
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  z0 = torch.randn(batch, 8, latent, latent, latent, device=device())

  def step():
    z1, t = torch.randn_like(z0), torch.rand(batch, device=device())
    zt = (1 - t)[:, None, None, None, None] * z0 + t[:, None, None, None, None] * z1
    with _autocast(dtype):
      diff = model(zt, t).float() - (z1 - z0)
      loss = 0.9 * diff.abs().mean() + 0.1 * (diff**2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()

  return f"torch flow train step {latent}^3x8 b{batch} {dtype}", timeit(step, repeats)


def bench_piece(stage: str, size: int, batch: int, repeats: int, dtype: str) -> tuple[str, float]:
  """`bench.run`'s `conv3` / `resblock`: forward + backward of mean |output| with input and
  parameter gradients, at the width of the thesis decoder's last stage, at full size."""
  # pylint: disable=import-outside-toplevel
  from bench.torch_models import ResBlock, SamePadConv3d
  from experiments.configs.vqgan import get_config

  width = 2 * get_config("thesis").model.n_hiddens
  model = (SamePadConv3d(width, width, 3) if stage == "conv3" else ResBlock(width)).to(device())
  x = torch.randn(batch, width, size, size, size, device=device(), requires_grad=True)

  def step():
    model.zero_grad(set_to_none=True)
    x.grad = None
    with _autocast(dtype):
      loss = model(x).float().abs().mean()
    loss.backward()
    return loss.detach()

  return f"torch {stage} fwd+bwd {size}^3x{width} b{batch} {dtype}", timeit(step, repeats)


def run(
  stages: list[str], size: int, batch: int, repeats: int, dtype: str, downsample: int
) -> dict[str, tuple[str, float]]:
  """(label, seconds) by stage name for the stages PyTorch has a counterpart of."""
  torch.set_num_threads(os.cpu_count() or 1)
  if torch.cuda.is_available():
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
  rows = {}
  thesis_layout = downsample == 4  # the PyTorch autoencoder has the thesis' two stages only
  if "vqgan_ae" in stages and thesis_layout:
    rows["vqgan_ae"] = bench_ae(size, batch, repeats, dtype)
  if "vqgan" in stages and thesis_layout:
    rows["vqgan"] = bench_vqgan(size, batch, repeats, dtype)
  if "flow" in stages:
    rows["flow"] = bench_flow(size // downsample, batch, repeats, dtype)
  for stage in ("conv3", "resblock"):
    if stage in stages:
      rows[stage] = bench_piece(stage, size, batch, repeats, dtype)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stages", default="vqgan_ae,flow")
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--downsample", type=int, default=4)
  parser.add_argument(
    "--host-memory",
    choices=("reuse", "default"),
    default="default",
    help="the glibc settings of latentfm.train.host_memory, or glibc's",
  )
  args = parser.parse_args()
  if args.host_memory == "reuse":
    from latentfm.train import host_memory  # pylint: disable=import-outside-toplevel

    host_memory.keep_freed_memory()
  rows = run(
    args.stages.split(","), args.size, args.batch, args.repeats, args.dtype, args.downsample
  )
  for stage, (label, seconds) in rows.items():
    print(json.dumps({"name": stage, "label": label, "seconds": seconds}), flush=True)


if __name__ == "__main__":
  main()

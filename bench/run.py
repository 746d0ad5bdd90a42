r"""Benchmarks, in one process: train steps of both stages, sampling, and PyTorch references.

  python -m bench.run --size 32 --batch 2 [--stages vqgan_ae,vqgan,flow,sample] [--torch]

Every figure is the median of `--repeats` timed calls after one warm-up (compilation) call,
with `block_until_ready`. `vqgan_ae` is the thesis encoder + decoder forward+backward of an L1
loss (the thesis VQ-GAN's dominant cost); `vqgan` is the full train step (both discriminators,
LPIPS on a slice); `flow` is the thesis UNet train step on the matching latent; `sample` is
Euler-50 + decode and tsit5 + decode of one volume. `--torch` times the same autoencoder in
PyTorch (bench/torch_models.py) in the same run, and the flow train step with the same UNet
in PyTorch (AdamW, clipping, hybrid loss), in a fresh child process with the same environment,
and prints the JAX/PyTorch ratios. The JAX training steps compile with
`latentfm.train.compiler.compiler_options()` and run with `latentfm.train.host_memory`'s reuse
of host memory, as the trainers do (`--host-memory default` turns it off).
`--torch-host-memory reuse` gives the PyTorch process the same glibc settings
(`keep_freed_memory`), to compare both under one allocator policy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from latentfm.train import host_memory
from latentfm.train.compiler import jit_train_step


def timeit(fn, repeats: int, sync=jax.block_until_ready) -> float:
  """Median wall time of `sync(fn())` over `repeats` calls, after one warm-up call.

  `sync` waits for the result: JAX's asynchronous dispatch by default; PyTorch on the CPU is
  synchronous, so its callers pass the identity.
  """
  sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def flops_of(jitted, *args) -> float | None:
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def report(name: str, seconds: float, batch: int, flops: float | None) -> dict:
  row = {"name": name, "ms": seconds * 1e3, "volumes_per_s": batch / seconds}
  if flops:
    row["tflops_per_s"] = flops / seconds / 1e12
  print(f"{name:<28} {row['ms']:10.1f} ms  {row['volumes_per_s']:8.2f} vol/s"
        + (f"  {row['tflops_per_s']:.3f} TFLOP/s" if flops else ""), flush=True)
  return row


def bench_vqgan_ae(size: int, batch: int, repeats: int) -> dict:
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel
  from latentfm.nn.vqgan import VQGAN  # pylint: disable=import-outside-toplevel
  model = VQGAN.from_config(get_config("thesis").model)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, size, 1)),
                  jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

  def loss(params):
    z = model.apply({**variables, "params": params}, x, method=model.encode)
    recon = model.apply({**variables, "params": params}, z, method=model.decode)
    return jnp.mean(jnp.abs(recon - x))

  step = jit_train_step(jax.grad(loss))
  seconds = timeit(lambda: step(variables["params"]), repeats)
  return report(f"vqgan_ae fwd+bwd {size}^3 b{batch}", seconds, batch,
                flops_of(step, variables["params"]))


def bench_vqgan(size: int, batch: int, repeats: int) -> dict:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.vqgan import get_config
  from latentfm.nn.lpips import load_params
  from latentfm.train.vqgan_step import create_state, make_train_step
  config = get_config("thesis")
  config.data.shape = (size,) * 3
  config.optim.accumulate = 1
  state = create_state(jax.random.PRNGKey(0), config)
  lpips = load_params()
  batch_data = {"image": jnp.asarray(np.random.default_rng(0).random(
      (batch, size, size, size, 1), dtype=np.float32))}
  step = jit_train_step(make_train_step(config, use_gan=True))
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], batch_data, lpips)
    return metrics

  seconds = timeit(call, repeats)
  return report(f"vqgan train step {size}^3 b{batch}", seconds, batch, None)


def bench_flow(size: int, batch: int, repeats: int, dtype: str = "float32",
               remat: bool = False) -> dict:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.flow import get_config
  from latentfm.train.flow_step import create_state, make_train_step
  config = get_config("thesis")
  config.model.dtype, config.model.remat = dtype, remat
  latent = (size // 4,) * 3 + (8,)
  state = create_state(jax.random.PRNGKey(0), config, latent)
  z = {"image": jnp.asarray(np.random.default_rng(0).standard_normal((batch,) + latent),
                            jnp.float32)}
  step = jit_train_step(make_train_step(config))
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], z)
    return metrics

  seconds = timeit(call, repeats)
  return report(f"flow train step {latent[0]}^3x8 b{batch} {dtype}{' remat' if remat else ''}",
                seconds, batch,
                flops_of(step, state, z))


def bench_sample(size: int, repeats: int) -> list[dict]:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.flow import get_config as flow_config
  from experiments.configs.vqgan import get_config as vq_config
  from latentfm.nn.unet3d import UNet3D
  from latentfm.nn.vqgan import VQGAN
  from latentfm.sample import integrate, velocity_from_model
  unet = UNet3D.from_config(flow_config("thesis").model)
  vq = VQGAN.from_config(vq_config("thesis").model)
  latent = (1,) + (size // 4,) * 3 + (8,)
  z1 = jax.random.normal(jax.random.PRNGKey(0), latent)
  params = jax.jit(lambda k: unet.init(k, z1, jnp.zeros((1,))))(jax.random.PRNGKey(1))["params"]
  vq_vars = jax.jit(vq.init)(jax.random.PRNGKey(2), jnp.zeros((1,) + (size,) * 3 + (1,)))
  decode = jax.jit(lambda v, z: vq.apply(v, z, method=vq.decode))
  velocity = velocity_from_model(unet.apply, params)
  rows = []
  for solver in ("euler", "tsit5"):
    fn = lambda s=solver: decode(vq_vars, integrate(velocity, z1, solver=s, steps=50)[0])
    rows.append(report(f"sample {solver} + decode {size}^3", timeit(fn, repeats), 1, None))
  return rows


def bench_torch_ae(size: int, batch: int, repeats: int) -> tuple[str, float]:
  import torch  # pylint: disable=import-outside-toplevel
  from bench.torch_models import ThesisAutoencoder  # pylint: disable=import-outside-toplevel
  model = ThesisAutoencoder()
  x = torch.rand(batch, 1, size, size, size) * 2 - 1

  def step():
    model.zero_grad(set_to_none=True)
    loss = (model(x) - x).abs().mean()
    loss.backward()
    return loss.detach()

  return (f"torch vqgan_ae fwd+bwd {size}^3 b{batch}",
          timeit(step, repeats, sync=lambda out: out))


def bench_torch_flow(size: int, batch: int, repeats: int) -> tuple[str, float]:
  import torch  # pylint: disable=import-outside-toplevel
  from bench.torch_models import FlowUNet3d  # pylint: disable=import-outside-toplevel
  model = FlowUNet3d()  # the thesis UNet (37,910,568 parameters), dropout 0.5
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  latent = (size // 4,) * 3
  z0 = torch.randn(batch, 8, *latent)

  def step():
    z1, t = torch.randn_like(z0), torch.rand(batch)
    zt = (1 - t)[:, None, None, None, None] * z0 + t[:, None, None, None, None] * z1
    diff = model(zt, t) - (z1 - z0)
    loss = 0.9 * diff.abs().mean() + 0.1 * (diff ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()

  return (f"torch flow train step {latent[0]}^3x8 b{batch}",
          timeit(step, repeats, sync=lambda out: out))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--stages", default="vqgan_ae,flow,sample")
  parser.add_argument("--torch", action="store_true")
  parser.add_argument("--dtype", default="float32", help="flow UNet compute dtype (bfloat16)")
  parser.add_argument("--remat", action="store_true", help="rematerialise UNet res blocks")
  parser.add_argument("--host-memory", choices=("reuse", "default"), default="reuse",
                      help="JAX: reuse host buffers across steps as the trainers do, or not")
  parser.add_argument("--torch-host-memory", choices=("reuse", "default"), default="default",
                      help="PyTorch: the same glibc settings as JAX's reuse, or glibc's defaults")
  parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  stages = args.stages.split(",")
  if args.torch_only:
    if args.torch_host_memory == "reuse":
      host_memory.keep_freed_memory()
    run_torch(stages, args)
    return
  if args.host_memory == "reuse":
    host_memory.reuse_host_memory()
  # PyTorch runs first, in a fresh process with the same environment, so that neither
  # framework's thread pools or memory (JAX's, kept for reuse) slow the other down.
  torch_rows = _torch_child(stages, args) if args.torch else {}
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"host memory {args.host_memory}")
  jax_ae = bench_vqgan_ae(args.size, args.batch, args.repeats) if "vqgan_ae" in stages else None
  if "vqgan" in stages:
    bench_vqgan(args.size, args.batch, args.repeats)
  jax_flow = (bench_flow(args.size, args.batch, args.repeats, args.dtype, args.remat)
              if "flow" in stages else None)
  if "sample" in stages:
    bench_sample(args.size, args.repeats)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak host memory: {peak:.0f} MiB", flush=True)
  for name, mine, theirs in (("vqgan_ae", jax_ae, torch_rows.get("vqgan_ae")),
                             ("flow step", jax_flow, torch_rows.get("flow"))):
    if mine and theirs:
      report(f"{theirs['label']} (host memory {args.torch_host_memory})", theirs["seconds"],
             args.batch, None)
      print(f"ratio JAX/PyTorch ({name}): {mine['ms'] / 1e3 / theirs['seconds']:.2f}")


def _torch_child(stages: list[str], args) -> dict[str, dict]:
  """Runs `run_torch` in a child process; its timings by stage name."""
  if not {"vqgan_ae", "flow"} & set(stages):
    return {}
  command = [sys.executable, "-m", "bench.run", "--torch-only", "--stages", args.stages,
             "--size", str(args.size), "--batch", str(args.batch),
             "--repeats", str(args.repeats), "--torch-host-memory", args.torch_host_memory]
  out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return {row["name"]: row for row in map(json.loads, out.splitlines()) if row}


def run_torch(stages: list[str], args) -> None:
  """The PyTorch side of `--torch`, one JSON line per timing (run as a child process)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  for stage, bench in (("vqgan_ae", bench_torch_ae), ("flow", bench_torch_flow)):
    if stage in stages:
      label, seconds = bench(args.size, args.batch, args.repeats)
      print(json.dumps({"name": stage, "label": label, "seconds": seconds}), flush=True)


if __name__ == "__main__":
  main()

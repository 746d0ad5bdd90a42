r"""Benchmarks, in one process: train steps of both stages, sampling, and PyTorch references.

  python -m bench.run --size 32 --batch 2 [--stages vqgan_ae,vqgan,flow,sample] [--torch]
      [--dtype bfloat16] [--remat] [--recompute-norms] [--downsample 2]

Every figure is the median of `--repeats` timed calls after one warm-up call, synchronised
(`block_until_ready`). Stages:
- `vqgan_ae`: the thesis encoder + decoder, forward + backward of an L1 loss (the VQ-GAN's
  dominant cost);
- `vqgan`: the full thesis VQ-GAN train step (quantiser, both discriminators and their update,
  LPIPS on a slice);
- `flow`: the thesis UNet train step on the matching latent (size / downsample);
- `sample`: Euler-50 + decode and tsit5 + decode of one volume;
- `conv3`, `resblock`: the autoencoder's widest pieces alone, at full size with the decoder's
  last width (thesis: 32 channels): a replicate-padded 3x3x3 convolution and a residual block,
  forward + backward (input and parameter gradients) of mean |output|, to see which piece a
  whole-model ratio comes from.
`--dtype`/`--remat`/`--recompute-norms` set the models' computation dtype and
rematerialisation (whole residual blocks, or the GroupNorm + SiLU intermediates), `--downsample`
the VQ-GAN's factor per axis (thesis 4; 2 gives a latent twice as large per axis). Each row
prints ms/step, volumes/s and, where XLA's cost analysis gives the model's FLOPs (counted with
plain `lax` convolutions, whichever formulation runs), TFLOP/s and, on a GPU of known peak,
MFU (bfloat16 against the dense bf16 tensor-core peak, float32 against the TF32 one, which XLA
and cuDNN use for float32 convolutions by default). A CPU has no known peak: there the rows
give their share of the rate of a 2048³ matrix product measured in the same process
(`cpu_matmul_rate`). PyTorch's rows use the same FLOPs. Peak device memory is printed on
accelerators, peak host memory always.

`--torch` first times the same work in PyTorch (`bench/torch_run.py`; CUDA when available) in a
fresh child process with the same environment, then prints the JAX/PyTorch ratios. With
`--rounds R` the two alternate R times (a fresh PyTorch process each round, JAX compiled once),
and the ratio printed is the median of the rounds' ratios with their range: a shared machine's
speed drifts by 10-20% between runs, more than the differences measured. The JAX
steps compile with `latentfm.train.compiler.compiler_options()` and, on the CPU, run with
`latentfm.train.host_memory`'s reuse of host memory, as the trainers do (`--host-memory
default` turns it off); `--torch-host-memory reuse` gives PyTorch the same glibc settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import dataclasses
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import timing
from latentfm.nn.layers import resolve_conv_impl, use_conv_impl
from latentfm.train import compiler, host_memory

# Dense peak FLOP/s by device kind (substring, first match) and compute dtype: bf16 and TF32
# tensor cores. The PCIe and NVL cards of the H100 run at lower clocks than the SXM one.
PEAK_FLOPS = {
  "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
  "H100 NVL": {"bfloat16": 835e12, "float32": 418e12},
  "H100": {"bfloat16": 989e12, "float32": 495e12},
  "H200": {"bfloat16": 989e12, "float32": 495e12},
  "A100": {"bfloat16": 312e12, "float32": 156e12},
}


# The stages `bench/torch_run.py` has a PyTorch counterpart of.
TORCH_STAGES = ("vqgan_ae", "vqgan", "flow", "conv3", "resblock")


@dataclasses.dataclass
class Work:
  """One compiled piece of work to time: `call()` runs it once."""

  stage: str
  label: str
  call: Callable[[], Any]
  batch: int
  flops: float | None = None
  dtype: str = "float32"


def timeit(fn, repeats: int) -> float:
  """`bench.timing.timeit` waiting for JAX's asynchronous results."""
  return timing.timeit(fn, repeats, sync=jax.block_until_ready)


def compile_step(fn, *args, donate_state: bool = False):
  """`(compiled, flops)`: `fn` compiled for `args` as the trainers compile it (donating the
  train state, the first argument, when `donate_state`), and its model FLOPs: XLA's cost
  analysis of `fn` lowered with every convolution as one `lax` convolution (None where XLA
  gives none). So the count is the model's own arithmetic, the same whichever formulation runs
  (the CPU's slab and sub-pixel ones do a few percent more) and the same work PyTorch does. The
  compiled program's own analysis would not do: XLA:GPU does not count the convolutions it
  hands to cuDNN (on an H200 it gave 1/40 of the flow step's FLOPs). Prints the compile time."""
  jit_kwargs = {"donate_argnums": 0} if donate_state else {}
  start = time.perf_counter()
  lowered = compiler.jit(fn, **jit_kwargs).lower(*args)
  compiled = lowered.compile()
  print(f"  (compiled in {time.perf_counter() - start:.1f} s)", flush=True)
  try:
    if resolve_conv_impl() != "lax":  # accelerators run "lax" already: no second trace there
      with use_conv_impl("lax"):  # a fresh function: no trace of the other formulation is reused
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    flops = None
  return compiled, flops


@functools.cache
def cpu_matmul_rate(dtype: str, n: int = 2048) -> float:
  """FLOP/s of an n x n x n matrix product in `dtype` (float32 sums) on this machine's CPU,
  median of 5 after a warm-up: the ceiling that CPU rows are put against, as no peak is known
  for a CPU (a virtual one least of all)."""
  a = jnp.ones((n, n), dtype)
  product = compiler.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n**3 / timeit(lambda: product(a, a), 5)


def peak_flops(dtype: str) -> float | None:
  """Dense peak FLOP/s of the first device in `dtype`; None for a device not in PEAK_FLOPS."""
  kind = jax.devices()[0].device_kind
  return next((p[dtype] for name, p in PEAK_FLOPS.items() if name in kind), None)


def report(
  name: str, seconds: float, batch: int, flops: float | None = None, dtype: str = "float32"
) -> dict:
  row = {"name": name, "ms": seconds * 1e3, "volumes_per_s": batch / seconds}
  text = f"{name:<40} {row['ms']:10.1f} ms  {row['volumes_per_s']:8.2f} vol/s"
  if flops:
    row["tflops_per_s"] = flops / seconds / 1e12
    text += f"  {row['tflops_per_s']:.3f} TFLOP/s"
    peak = peak_flops(dtype)
    if peak:
      row["mfu"] = flops / seconds / peak
      text += f"  MFU {100 * row['mfu']:.1f}%"
    elif jax.default_backend() == "cpu":
      row["of_matmul_rate"] = flops / seconds / cpu_matmul_rate(dtype)
      text += f"  {100 * row['of_matmul_rate']:.0f}% of the matmul rate"
  print(text, flush=True)
  return row


def vqgan_config(size: int, downsample: int):
  """The thesis VQ-GAN config at `size`³ with `downsample` per axis, one batch per step."""
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel

  config = get_config("thesis")
  config.data.shape = (size,) * 3
  config.optim.accumulate = 1
  config.model.downsample = (downsample,) * 3
  return config


def _model_options(model, args: argparse.Namespace) -> None:
  """`--dtype`, `--remat` and `--recompute-norms` on a config's `model` section (both stages)."""
  model.dtype, model.remat, model.recompute_norms = args.dtype, args.remat, args.recompute_norms


def _suffix(args) -> str:
  light = " recompute-norms" if args.recompute_norms else ""
  return f" {args.dtype}{' remat' if args.remat else ''}{light} f{args.downsample}"


def bench_vqgan_ae(args) -> list[Work]:
  from latentfm.nn.vqgan import VQGAN  # pylint: disable=import-outside-toplevel

  config = vqgan_config(args.size, args.downsample)
  _model_options(config.model, args)
  model = VQGAN.from_config(config.model)
  shape = (args.batch,) + (args.size,) * 3 + (1,)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32)
  variables = compiler.jit(model.init)(jax.random.PRNGKey(0), x)

  def loss(params, x):
    z = model.apply({**variables, "params": params}, x, method=model.encode)
    recon = model.apply({**variables, "params": params}, z, method=model.decode)
    return jnp.mean(jnp.abs(recon - x))

  step, flops = compile_step(jax.grad(loss), variables["params"], x)
  return [
    Work(
      "vqgan_ae",
      f"vqgan_ae fwd+bwd {args.size}^3 b{args.batch}{_suffix(args)}",
      lambda: step(variables["params"], x),
      args.batch,
      flops,
      args.dtype,
    )
  ]


def bench_vqgan(args) -> list[Work]:
  # pylint: disable=import-outside-toplevel
  from latentfm.nn.lpips import load_params
  from latentfm.train.vqgan_step import create_state, make_train_step

  config = vqgan_config(args.size, args.downsample)
  _model_options(config.model, args)
  state = create_state(jax.random.PRNGKey(0), config)
  lpips = load_params()
  batch = {
    "image": jnp.asarray(
      np.random.default_rng(0).random((args.batch,) + (args.size,) * 3 + (1,), dtype=np.float32)
    )
  }
  step, flops = compile_step(
    make_train_step(config, use_gan=True), state, batch, lpips, donate_state=True
  )
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], batch, lpips)
    return metrics

  return [
    Work(
      "vqgan",
      f"vqgan train step {args.size}^3 b{args.batch}{_suffix(args)}",
      call,
      args.batch,
      flops,
      args.dtype,
    )
  ]


def bench_flow(args) -> list[Work]:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.flow import get_config
  from latentfm.train.flow_step import create_state, make_train_step

  config = get_config("thesis")
  _model_options(config.model, args)
  latent = (args.size // args.downsample,) * 3 + (8,)
  state = create_state(jax.random.PRNGKey(0), config, latent)
  z = {
    "image": jnp.asarray(
      np.random.default_rng(0).standard_normal((args.batch,) + latent), jnp.float32
    )
  }
  step, flops = compile_step(make_train_step(config), state, z, donate_state=True)
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], z)
    return metrics

  return [
    Work(
      "flow",
      f"flow train step {latent[0]}^3x8 b{args.batch}{_suffix(args)}",
      call,
      args.batch,
      flops,
      args.dtype,
    )
  ]


def piece_width() -> int:
  """Channels of the thesis decoder's last stage, the widest at full size."""
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel

  return 2 * get_config("thesis").model.n_hiddens


def _piece(stage: str, make_module: Callable[[int], Any], args) -> list[Work]:
  """Forward + backward of mean |module(x)| for x of `piece_width()` channels at full size,
  the module made by `make_module(width)`.

  The loss reads the output, so the forward pass stays in the program: a vjp alone would let
  XLA drop the forward convolutions, which its backward does not need.
  """
  width = piece_width()
  module = make_module(width)
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((args.batch,) + (args.size,) * 3 + (width,)),
    jnp.float32,
  )
  params = compiler.jit(module.init)(jax.random.PRNGKey(0), x)
  loss = lambda p, x: jnp.mean(jnp.abs(module.apply(p, x).astype(jnp.float32)))
  step, flops = compile_step(jax.grad(loss, argnums=(0, 1)), params, x)
  return [
    Work(
      stage,
      f"{stage} fwd+bwd {args.size}^3x{width} b{args.batch} {args.dtype}",
      lambda: step(params, x),
      args.batch,
      flops,
      args.dtype,
    )
  ]


def bench_conv3(args) -> list[Work]:
  from latentfm.nn.layers import SamePadConv  # pylint: disable=import-outside-toplevel

  return _piece("conv3", lambda width: SamePadConv(width, 3, 1, jnp.dtype(args.dtype)), args)


def bench_resblock(args) -> list[Work]:
  from latentfm.nn.layers import ResBlock  # pylint: disable=import-outside-toplevel

  return _piece(
    "resblock",
    lambda width: ResBlock(dtype=jnp.dtype(args.dtype), recompute_norms=args.recompute_norms),
    args,
  )


def bench_sample(args) -> list[Work]:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.flow import get_config as flow_config
  from latentfm.nn.unet3d import UNet3D
  from latentfm.nn.vqgan import VQGAN
  from latentfm.sample import integrate, velocity_from_model

  flow = flow_config("thesis")
  flow.model.dtype = args.dtype
  unet = UNet3D.from_config(flow.model)
  vq_config = vqgan_config(args.size, args.downsample)
  vq_config.model.dtype = args.dtype
  vq = VQGAN.from_config(vq_config.model)
  z1 = jax.random.normal(jax.random.PRNGKey(0), (1,) + (args.size // args.downsample,) * 3 + (8,))
  init = compiler.jit(lambda k: unet.init(k, z1, jnp.zeros((1,))))
  params = init(jax.random.PRNGKey(1))["params"]
  vq_vars = compiler.jit(vq.init)(jax.random.PRNGKey(2), jnp.zeros((1,) + (args.size,) * 3 + (1,)))
  decode = compiler.jit(lambda v, z: vq.apply(v, z, method=vq.decode))
  velocity = velocity_from_model(unet.apply, params)
  return [
    Work(
      "sample",
      f"sample {solver} + decode {args.size}^3 {args.dtype} f{args.downsample}",
      lambda s=solver: decode(vq_vars, integrate(velocity, z1, solver=s, steps=50)[0]),
      1,
    )
    for solver in ("euler", "tsit5")
  ]


def memory_summary() -> str:
  text = f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    text += f", peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--stages", default="vqgan_ae,flow,sample")
  parser.add_argument("--torch", action="store_true")
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="computation dtype of the models (parameters stay float32)",
  )
  parser.add_argument("--remat", action="store_true", help="recompute residual blocks")
  parser.add_argument(
    "--recompute-norms",
    action="store_true",
    help="recompute GroupNorm + SiLU intermediates in the backward pass",
  )
  parser.add_argument("--downsample", type=int, default=4, help="VQ-GAN factor per axis")
  parser.add_argument(
    "--host-memory",
    choices=("reuse", "default"),
    default="reuse",
    help="JAX: reuse host buffers across steps as the trainers do, or not",
  )
  parser.add_argument(
    "--torch-host-memory",
    choices=("reuse", "default"),
    default="default",
    help="PyTorch: the same glibc settings as JAX's reuse, or glibc's defaults",
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="with --torch: alternate PyTorch and JAX this many times and print "
    "the median ratio with its range (machines drift between runs)",
  )
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  stages = args.stages.split(",")
  if args.host_memory == "reuse":
    host_memory.reuse_host_memory()
  benches = {
    "vqgan_ae": bench_vqgan_ae,
    "vqgan": bench_vqgan,
    "flow": bench_flow,
    "sample": bench_sample,
    "conv3": bench_conv3,
    "resblock": bench_resblock,
  }
  works, mine, theirs = [], {}, {}
  for round_ in range(args.rounds if args.torch else 1):
    # PyTorch runs in a fresh process with the same environment, first in the first round, so
    # that neither framework's thread pools or memory (JAX's, kept for reuse) slow the other.
    for stage, row in (_torch_child(args) if args.torch else {}).items():
      theirs.setdefault(stage, []).append(row)
    if not works:
      print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"jax {jax.__version__}, host memory {args.host_memory}",
        flush=True,
      )
      works = [w for stage in benches if stage in stages for w in benches[stage](args)]
    for w in works:
      mine.setdefault(w.label, []).append(timeit(w.call, args.repeats))
    if args.rounds > 1:
      print(
        f"round {round_ + 1}: "
        + ", ".join(
          f"{stage} {mine[_work(works, stage).label][-1] / rows[-1]['seconds']:.2f}"
          for stage, rows in theirs.items()
        ),
        flush=True,
      )
  if jax.default_backend() == "cpu" and any(w.flops for w in works):
    print(
      f"CPU matmul rate, 2048^3 {args.dtype}: {cpu_matmul_rate(args.dtype) / 1e9:.0f} GFLOP/s",
      flush=True,
    )
  for w in works:
    report(w.label, statistics.median(mine[w.label]), w.batch, w.flops, w.dtype)
  print(memory_summary(), flush=True)
  for stage, rows in theirs.items():
    seconds = [row["seconds"] for row in rows]
    work = _work(works, stage)
    report(
      f"{rows[0]['label']} (host memory {args.torch_host_memory})",
      statistics.median(seconds),
      args.batch,
      work.flops,
      work.dtype,
    )
    median, low, high = ratio_summary(mine[work.label], seconds)
    spread = f" (range {low:.2f}-{high:.2f} over {len(seconds)} rounds)" if len(rows) > 1 else ""
    print(f"ratio JAX/PyTorch ({stage}): {median:.2f}{spread}", flush=True)


def _work(works: list[Work], stage: str) -> Work:
  """The (first) work of `stage`: the one its PyTorch counterpart is compared with."""
  return next(w for w in works if w.stage == stage)


def ratio_summary(mine: list[float], theirs: list[float]) -> tuple[float, float, float]:
  """Median, lowest and highest of the per-round ratios mine[i] / theirs[i]."""
  ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
  return statistics.median(ratios), min(ratios), max(ratios)


def _torch_child(args) -> dict[str, dict]:
  """Runs the PyTorch benchmarks in a child process; their timings by stage name."""
  if not set(TORCH_STAGES) & set(args.stages.split(",")):
    return {}
  command = [
    sys.executable,
    "-m",
    "bench.torch_run",
    "--stages",
    args.stages,
    "--size",
    str(args.size),
    "--batch",
    str(args.batch),
    "--repeats",
    str(args.repeats),
    "--dtype",
    args.dtype,
    "--downsample",
    str(args.downsample),
    "--host-memory",
    args.torch_host_memory,
  ]
  out = subprocess.run(command, check=False, capture_output=True, text=True)
  if out.returncode:
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    sys.exit(f"bench.torch_run failed (exit {out.returncode}): {last}")
  return {row["name"]: row for row in map(json.loads, out.stdout.splitlines()) if row}


if __name__ == "__main__":
  main()

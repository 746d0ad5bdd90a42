"""Measuring and reporting the benchmarks: compile with a model FLOP count, time, and print a row.

A row gives ms/step, volumes/s and, where XLA's cost analysis gives the model's FLOPs, TFLOP/s
and either the MFU against a known accelerator peak or, on a CPU, the share of the rate of a
2048³ matrix product measured in the same process.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from bench import timing
from latentfm.nn.layers import resolve_conv_impl, use_conv_impl
from latentfm.train import compiler

# Dense peak FLOP/s by device kind (substring, first match) and compute dtype: bf16 and TF32
# tensor cores. The PCIe and NVL cards of the H100 run at lower clocks than the SXM one.
PEAK_FLOPS = {
  "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
  "H100 NVL": {"bfloat16": 835e12, "float32": 418e12},
  "H100": {"bfloat16": 989e12, "float32": 495e12},
  "H200": {"bfloat16": 989e12, "float32": 495e12},
  "A100": {"bfloat16": 312e12, "float32": 156e12},
}


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


def memory_summary() -> str:
  text = f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    text += f", peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
  return text


def ratio_summary(mine: list[float], theirs: list[float]) -> tuple[float, float, float]:
  """Median, lowest and highest of the per-round ratios mine[i] / theirs[i]."""
  ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
  return statistics.median(ratios), min(ratios), max(ratios)

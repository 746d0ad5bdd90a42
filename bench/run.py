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

The stages are built in `bench.stages` and timed and reported with `bench.measure`.

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
import json
import statistics
import subprocess
import sys

import jax

from bench.measure import Work, cpu_matmul_rate, memory_summary, ratio_summary, report, timeit
from bench.stages import (
  TORCH_STAGES,
  bench_conv3,
  bench_flow,
  bench_resblock,
  bench_sample,
  bench_vqgan,
  bench_vqgan_ae,
)
from latentfm.train import host_memory


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

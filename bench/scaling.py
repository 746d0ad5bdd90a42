r"""Data-parallel scaling: the flow train step on 1, 2, 4, ... devices at a fixed per-device batch.

  python -m bench.scaling --devices 1,2,4 --per-device-batch 2 [--config thesis] [--latent 8]

Each device count runs in its own process (on the CPU the devices are forced with
`--xla_force_host_platform_device_count`, so they share the host's cores; on accelerators the
first N real devices are used). Prints step time, throughput and throughput per device; exits
with status 1 if any device count failed.
Each child reuses host memory across steps as the trainers do (`latentfm.train.host_memory`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(args) -> None:
  """Times the jitted, sharded flow step on the first `args.child` devices; prints JSON."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np

  from bench.measure import timeit
  from experiments.configs.flow import get_config
  from latentfm.train import compiler, flow_step, host_memory, parallel

  host_memory.reuse_host_memory()  # as the trainers do
  config = get_config(args.config)
  mesh = parallel.make_mesh(jax.devices()[: args.child])
  latent = (args.latent,) * 3 + (8,)
  state = parallel.replicate(flow_step.create_state(jax.random.PRNGKey(0), config, latent), mesh)
  batch = args.per_device_batch * args.child
  z = np.random.default_rng(0).standard_normal((batch,) + latent).astype(np.float32)
  batch_data = {"image": z}
  if config.model.num_classes:  # a stage-conditional config trains on labelled latents
    batch_data["label"] = np.arange(batch, dtype=np.int32) % config.model.num_classes
  data = parallel.shard_batch(batch_data, mesh)
  step = compiler.jit(flow_step.make_train_step(config), donate_argnums=0)  # as the trainer
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], data)
    return metrics

  seconds = timeit(call, args.repeats)
  print(
    json.dumps(
      {
        "devices": args.child,
        "kind": jax.devices()[0].device_kind,
        "batch": batch,
        "seconds": seconds,
      }
    )
  )


def device_counts(text: str) -> list[int]:
  """`"1,2,4"` -> [1, 2, 4]; argparse's error for anything but positive integers."""
  try:
    counts = [int(n) for n in text.split(",")]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
  return counts


def main(argv: list[str] | None = None) -> int:
  """Runs one child process per device count and prints the table; 1 if any child failed."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=device_counts, default="1,2,4")
  parser.add_argument("--per-device-batch", type=int, default=2)
  parser.add_argument("--config", default="thesis")
  parser.add_argument("--latent", type=int, default=8, help="latent edge (thesis 64^3: 16)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return 0
  forced = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"
  print(
    f"flow train step, config {args.config}, latent {args.latent}^3x8, "
    f"{args.per_device_batch} per device"
  )
  print("| devices | global batch | step (ms) | volumes/s | volumes/s per device |")
  print("|---|---|---|---|---|")
  failed, shared_cores = 0, False
  for n in args.devices:
    env = dict(os.environ)
    if forced:
      env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
      ).strip()
    cmd = [
      sys.executable,
      "-m",
      "bench.scaling",
      "--child",
      str(n),
      "--config",
      args.config,
      "--latent",
      str(args.latent),
      "--per-device-batch",
      str(args.per_device_batch),
      "--repeats",
      str(args.repeats),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      failed += 1
      last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
      print(f"| {n} | failed: {last} | | | |", flush=True)
      continue
    row = json.loads(out.stdout.strip().splitlines()[-1])
    rate = row["batch"] / row["seconds"]
    print(
      f"| {n} | {row['batch']} | {row['seconds'] * 1e3:.0f} | {rate:.2f} | {rate / n:.2f} |",
      flush=True,
    )
    shared_cores |= forced and row["kind"] == "cpu" and n > 1
  if shared_cores:
    print("(forced CPU devices share this machine's cores: a test of correctness, not of speed)")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

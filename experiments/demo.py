r"""The whole pipeline on the embedded cohort, in minutes on 2 CPU cores.

  python -m experiments.demo --workdir runs/demo

VQ-GAN `demo` → flow `demo` → samples (NIfTI + PNG) → evaluation report. Each stage resumes from
its checkpoints if rerun (finished stages only re-validate). Outputs go to
WORKDIR/{vqgan,flow,samples} and the report to WORKDIR/flow/eval/report.md.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import common

flags.DEFINE_string("workdir", "runs/demo", "Root directory for all stages.")
flags.DEFINE_integer("num_samples", 8, "Volumes to sample at the end.")


def run(workdir: str, num_samples: int) -> None:
  # pylint: disable=import-outside-toplevel
  from experiments import evaluate, flow, sample, vqgan
  from experiments.configs import flow as flow_configs
  from experiments.configs import vqgan as vqgan_configs
  vq_dir, flow_dir = os.path.join(workdir, "vqgan"), os.path.join(workdir, "flow")
  print("== stage 1/4: VQ-GAN (demo config)", flush=True)
  metrics = vqgan.train_and_evaluate(vqgan_configs.get_config("demo"), vq_dir)
  print("vqgan: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
  print("== stage 2/4: latent flow matching (demo config)", flush=True)
  config = flow_configs.get_config("demo")
  config.vqgan_workdir = vq_dir
  metrics = flow.train_and_evaluate(config, flow_dir)
  print(f"flow: step {metrics['step']}, loss {metrics['loss']:.4f}", flush=True)
  print("== stage 3/4: samples", flush=True)
  sample.run(flow_dir, os.path.join(workdir, "samples"), num_samples, 0, "euler", 50, False)
  print("== stage 4/4: evaluation", flush=True)
  print(evaluate.run(flow_dir, 0, None, "euler", 50, 1234), flush=True)


def main(argv: list[str]) -> None:
  common.parse_plain_flags(argv)
  common.run_guarded(lambda: run(flags.FLAGS.workdir, flags.FLAGS.num_samples))


if __name__ == "__main__":
  main(sys.argv)

r"""The whole pipeline on the embedded cohort, on 2 CPU cores.

  python -m experiments.demo --workdir runs/demo
  python -m experiments.demo --preset cpu64 --workdir runs/cpu64   # the thesis' 64³, < 1 hour

VQ-GAN `PRESET` → flow `PRESET` → samples (NIfTI + PNG) → evaluation report. Each stage resumes
from its checkpoints if rerun (finished stages only re-validate). Outputs go to
WORKDIR/{vqgan,flow} and the next free WORKDIR/samples[_N], and the report to
WORKDIR/flow/eval/report.md.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import common

flags.DEFINE_string("workdir", "runs/demo", "Root directory for all stages.")
flags.DEFINE_integer("num_samples", 8, "Volumes to sample at the end.")
flags.DEFINE_enum(
  "preset",
  "demo",
  ["demo", "cpu64"],
  "Config pair of both stages: demo (32³, minutes) or cpu64 (64³, under an hour).",
)


def run(workdir: str, num_samples: int, preset: str = "demo") -> None:
  # pylint: disable=import-outside-toplevel
  from experiments import evaluate, flow, sample, vqgan
  from experiments.configs import flow as flow_configs
  from experiments.configs import vqgan as vqgan_configs
  from latentfm.atomic_write import next_free_dir

  vq_dir, flow_dir = os.path.join(workdir, "vqgan"), os.path.join(workdir, "flow")
  print(f"== stage 1/4: VQ-GAN ({preset} config)", flush=True)
  metrics = vqgan.train_and_evaluate(vqgan_configs.get_config(preset), vq_dir)
  print("vqgan: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
  print(f"== stage 2/4: latent flow matching ({preset} config)", flush=True)
  config = flow_configs.get_config(preset)
  config.vqgan_workdir = vq_dir
  metrics = flow.train_and_evaluate(config, flow_dir)
  print(f"flow: step {metrics['step']}, loss {metrics['loss']:.4f}", flush=True)
  print("== stage 3/4: samples", flush=True)
  sample.run(
    flow_dir,
    out=next_free_dir(os.path.join(workdir, "samples")),
    num=num_samples,
    balanced=config.model.num_classes > 0,
  )
  print("== stage 4/4: evaluation", flush=True)
  # Fewer sweep samples and edits than a full evaluation, to keep the demo within minutes; 8
  # per stage where the stage ordering is checked (real scans drawn 2 per stage come out in
  # order in only 65% of draws, 8 per stage in 90%).
  print(evaluate.run(flow_dir, per_stage=2, stage_samples=8, edit_subjects=4), flush=True)


def main(argv: list[str]) -> None:
  common.parse_plain_flags(argv)
  f = flags.FLAGS
  common.run_guarded(lambda: run(f.workdir, f.num_samples, f.preset))


if __name__ == "__main__":
  main(sys.argv)

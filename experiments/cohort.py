r"""Writes the embedded MNI152-based cohort as NIfTI files and a tri-planar montage.

  python -m experiments.cohort --out runs/cohort --n 40 --size 64
  python -m experiments.cohort --out runs/imbalanced --n 100 --proportions 0,0.01,0.29,0.70

The directory (NIfTI + manifest.csv) is usable as `--config.data.dir` of either stage.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
import numpy as np

from experiments import common

flags.DEFINE_string("out", "runs/cohort", "Output directory (must be new or a matching cohort).")
flags.DEFINE_integer("n", 40, "Number of subjects.")
flags.DEFINE_integer("size", 64, "Cube side in voxels.")
flags.DEFINE_integer("seed", 0, "Cohort seed.")
flags.DEFINE_string("montage", None, "Montage PNG path (default OUT/montage.png).")
flags.DEFINE_list(
  "proportions",
  None,
  "Stage weights normal,mild,moderate,advanced (default: balanced, round-robin).",
)


def run(
  out: str,
  *,
  n: int = 40,
  size: int = 64,
  seed: int = 0,
  montage: str | None = None,
  proportions: list[str] | None = None,
) -> None:
  from latentfm import viz  # pylint: disable=import-outside-toplevel
  from latentfm.data import cohort  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  try:
    weights = None if proportions is None else tuple(float(p) for p in proportions)
  except ValueError:
    raise ValueError(f"--proportions must be numbers, got {','.join(proportions)}") from None
  cohort.write_cohort(out, n, (size,) * 3, seed, weights)
  stages = cohort.cohort_stages(n, seed, weights)
  # Up to two subjects of each stage present, in stage order.
  shown = [int(i) for s in range(cohort.NUM_STAGES) for i in np.flatnonzero(stages == s)[:2]]
  template = cohort.load_template((size,) * 3)
  seeds = cohort.subject_seeds(n, seed)
  volumes = np.stack([cohort.make_subject(template, int(stages[i]), int(seeds[i])) for i in shown])
  labels = [f"{cohort.STAGE_NAMES[stages[i]]} #{i}" for i in shown]
  path = viz.save_triplanar(
    montage or os.path.join(out, "montage.png"),
    volumes,
    labels,
    title="embedded cohort: atrophy stages",
    at=cohort.VENTRICLE_LEVEL,
  )
  counts = ", ".join(
    f"{name} {int((stages == s).sum())}" for s, name in enumerate(cohort.STAGE_NAMES)
  )
  print(
    f"cohort: {n} subjects at {size}^3 in {out} ({counts}; "
    f"{time.perf_counter() - start:.1f} s); montage {path}"
  )


def main(argv: list[str]) -> None:
  f = common.parse_plain_flags(argv)
  common.run_guarded(
    lambda: run(
      f.out, n=f.n, size=f.size, seed=f.seed, montage=f.montage, proportions=f.proportions
    )
  )


if __name__ == "__main__":
  main(sys.argv)

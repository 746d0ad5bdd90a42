r"""Writes the embedded MNI152-based cohort as NIfTI files and a tri-planar montage.

  python -m experiments.cohort --out runs/cohort --n 40 --size 64

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

# Slice position through the lateral ventricles, where the stages differ most.
VENTRICLE_LEVEL = (0.56, 0.45, 0.42)


def run(out: str, n: int, size: int, seed: int, montage: str | None) -> None:
  from latentfm import viz  # pylint: disable=import-outside-toplevel
  from latentfm.data import cohort  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  cohort.write_cohort(out, n, (size,) * 3, seed)
  volumes, stages = cohort.make_cohort(min(n, 8), (size,) * 3, seed)
  order = np.argsort(stages, kind="stable")
  labels = [f"{cohort.STAGE_NAMES[stages[i]]} #{i}" for i in order]
  path = viz.save_triplanar(montage or os.path.join(out, "montage.png"), volumes[order], labels,
                            title="embedded cohort: atrophy stages", at=VENTRICLE_LEVEL)
  print(f"cohort: {n} subjects at {size}^3 in {out} ({time.perf_counter() - start:.1f} s); "
        f"montage {path}")


def main(argv: list[str]) -> None:
  f = common.parse_plain_flags(argv)
  common.run_guarded(lambda: run(f.out, f.n, f.size, f.seed, f.montage))


if __name__ == "__main__":
  main(sys.argv)

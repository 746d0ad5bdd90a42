r"""Writes synthetic volumes from a trained flow stage as NIfTI plus a tri-planar PNG.

  python -m experiments.sample --workdir runs/demo/flow --num 8 --solver euler --steps 50
  python -m experiments.sample --workdir runs/demo/flow --num 8 --label 3 --guidance 2
  python -m experiments.sample --workdir runs/demo/flow --num 8 --balanced
  python -m experiments.sample --workdir runs/fm128 --num 8 --decode_tile 32   # 128³ volumes
  python -m experiments.sample --workdir runs/ddpm --num 8 --solver ddim --steps 50 --eta 0

The VQ-GAN is found through the flow workdir's config (`vqgan_workdir`). The volumes carry the
VQ-GAN training data's median voxel size and orientation (its `geometry.json`) and a centred
origin; a VQ-GAN trained before that record existed gives 1 mm voxels, and the line says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from absl import flags
import numpy as np

from experiments import common


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained flow stage's workdir.")
  flags.DEFINE_string(
    "out",
    None,
    "A new or empty output directory (default: the first new or "
    "empty of WORKDIR/samples, WORKDIR/samples_1, ...).",
  )
  flags.DEFINE_integer("num", 8, "Number of volumes.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  common.define_solver_flags()
  flags.DEFINE_bool("snap", False, "Snap latents to the nearest codebook vectors first.")
  flags.DEFINE_integer("label", None, "Conditional flows: the class (stage) of every volume.")
  flags.DEFINE_bool("balanced", False, "Conditional flows: equal counts of every class.")
  flags.DEFINE_float(
    "guidance",
    1.0,
    "Classifier-free guidance weight w (0: unconditional, 1: conditional, >1: amplified).",
  )
  flags.DEFINE_integer(
    "decode_tile",
    None,
    "Decode in overlapping tiles of this many latent "
    "voxels (memory bounded by the tile; the same volumes).",
  )


def choose_out(workdir: str, out: str | None) -> str:
  """The output folder: `out` if new or empty (refused otherwise), or by default the first new
  or empty one of WORKDIR/samples, WORKDIR/samples_1, ..."""
  from latentfm.atomic_write import next_free_dir  # pylint: disable=import-outside-toplevel

  if out is None:
    return next_free_dir(os.path.join(workdir, "samples"))
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(
      f"--out {out} is not empty; choose a new folder (or leave out --out for "
      "the next free WORKDIR/samples_N)"
    )
  return out


def run(
  workdir: str,
  *,
  out: str | None = None,
  num: int = 8,
  seed: int = 0,
  solver: str | None = None,
  steps: int = 50,
  snap: bool = False,
  label: int | None = None,
  balanced: bool = False,
  guidance: float = 1.0,
  decode_tile: int | None = None,
  eta: float = 0.0,
) -> str:
  """Samples `num` volumes (of class `label`, or balanced over the classes) from the flow in
  `workdir` into a new folder; returns the folder. `solver` None picks the objective's
  default, `eta` is DDIM's noise level."""
  import jax  # pylint: disable=import-outside-toplevel

  from latentfm import sample  # pylint: disable=import-outside-toplevel

  if balanced and label is not None:
    raise ValueError("--label and --balanced exclude each other")
  out = choose_out(workdir, out)
  common.check_writable(os.path.dirname(os.path.abspath(out)))
  inside = os.path.abspath(out).startswith(os.path.abspath(workdir) + os.sep)
  with common.workdir_held(workdir, "sampling") if inside else contextlib.nullcontext():
    models = sample.load(workdir)
    labels = sample.balanced_labels(num, models.num_classes) if balanced else label
    solver = solver or sample.default_solver(models.objective)
    sample.check_solver(models.objective, solver)
    start = time.perf_counter()
    volumes, nfe = sample.sample(
      jax.random.PRNGKey(seed),
      models,
      num,
      labels=labels,
      guidance=guidance,
      solver=solver,
      steps=steps,
      eta=eta,
      snap_to_codebook=snap,
      decode_tile=decode_tile,
    )
    seconds = time.perf_counter() - start
    per_volume = None if labels is None else np.broadcast_to(labels, (num,))
    paths = sample.write_samples(out, volumes, geometry=models.geometry, labels=per_volume)
  what = (
    ""
    if per_volume is None
    else f", classes {sorted(set(per_volume.tolist()))} at guidance {guidance:g}"
  )
  where = (
    models.geometry.describe()
    if models.geometry
    else "voxel size 1 mm (the VQ-GAN workdir records no training geometry)"
  )
  print(
    f"sample: {len(paths)} volumes of {volumes.shape[1:]} in {out} ({solver}, NFE {nfe}, "
    f"{seconds:.1f} s including compilation{what}); {where}"
  )
  return out


def main(argv: list[str]) -> None:
  define_flags()
  f = common.parse_plain_flags(argv)
  if not f.workdir:
    common.fail("--workdir is required")
  if f.num < 1:
    common.fail(f"--num must be positive, got {f.num}")
  if f.decode_tile is not None and f.decode_tile < 1:
    common.fail(f"--decode_tile must be positive, got {f.decode_tile}")
  common.run_guarded(
    lambda: run(
      f.workdir,
      out=f.out,
      num=f.num,
      seed=f.seed,
      solver=f.solver,
      steps=f.steps,
      snap=f.snap,
      label=f.label,
      balanced=f.balanced,
      guidance=f.guidance,
      decode_tile=f.decode_tile,
      eta=f.eta,
    )
  )


if __name__ == "__main__":
  main(sys.argv)

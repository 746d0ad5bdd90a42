"""A deterministic cohort of realistic T1 brain volumes built from the MNI152 2009a template.

The template and its grey/white-matter maps ship inside the `nilearn` wheel (no download). Each
subject is the template warped by a random affine and a smooth random deformation, with an atrophy
stage 0–3 (normal → advanced) that enlarges the ventricles (a radial expansion around them) and
erodes tissue at every tissue/CSF interface (thinner cortex, wider sulci), then a bias field, a
GM/WM contrast change, a gamma curve and Rician noise. Stages are assigned round-robin, or in
given proportions (e.g. the thesis' data: 0%, 1%, 29%, 70%).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

from latentfm import atomic_write
from latentfm.data.io import Volume, VolumeError, write_volume

NUM_STAGES = 4
STAGE_NAMES = ("normal", "mild", "moderate", "advanced")
# Relative slice position (D, H, W) through the lateral ventricles, where the stages differ most.
VENTRICLE_LEVEL = (0.56, 0.45, 0.42)
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def template_path(kind: str = "t1") -> str:
  """Path of the MNI152 2009a `t1`, `gm` or `wm` map inside the installed nilearn package."""
  try:
    import nilearn.datasets.data as data  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(
      "the embedded cohort needs nilearn (which ships the MNI152 template): "
      "pip install 'latentfm[data]'"
    ) from None
  path = os.path.join(os.path.dirname(data.__file__), _TEMPLATE.format(kind))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: MNI152 template missing from the nilearn package")
  return path


@dataclasses.dataclass(frozen=True)
class Template:
  """Template maps resampled to the cohort grid, and the geometry of that grid."""

  t1: np.ndarray
  tissue: np.ndarray
  gm: np.ndarray
  mask: np.ndarray
  ventricle_centre: np.ndarray
  ventricle_sigma: np.ndarray
  csf_level: float
  spacing: tuple[float, float, float]
  origin: tuple[float, float, float]
  direction: tuple[float, ...]


@functools.lru_cache(maxsize=4)
def load_template(shape: tuple[int, int, int] = (64, 64, 64)) -> Template:
  """Reads the template and resamples it to a brain-centred cube sampled on `shape` voxels."""
  images = {k: sitk.ReadImage(template_path(k), sitk.sitkFloat32) for k in ("t1", "gm", "wm")}
  ref = images["t1"]
  t1_full = sitk.GetArrayViewFromImage(ref)
  nz = np.argwhere(t1_full > 0)  # (z, y, x)
  lo, hi = nz.min(0), nz.max(0) + 1
  side = float((hi - lo).max() + 6)  # a 3-voxel margin around the largest extent
  centre_zyx = (lo + hi - 1) / 2.0
  spacing_zyx = side / np.asarray(shape, float)
  first_zyx = centre_zyx - (np.asarray(shape) - 1) / 2.0 * spacing_zyx
  origin = ref.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in first_zyx[::-1]))
  spacing_xyz = tuple(float(s) for s in (spacing_zyx * np.asarray(ref.GetSpacing()[::-1]))[::-1])
  sigma = tuple(float(0.5 * np.sqrt(max(s * s - 1.0, 0.0))) for s in spacing_zyx[::-1])
  out = {}
  for k, image in images.items():
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma) if max(sigma) > 0 else image
    res = sitk.Resample(
      smooth,
      tuple(int(s) for s in shape[::-1]),
      sitk.Transform(),
      sitk.sitkLinear,
      origin,
      spacing_xyz,
      ref.GetDirection(),
      0.0,
      sitk.sitkFloat32,
    )
    out[k] = np.clip(sitk.GetArrayFromImage(res) / 255.0, 0.0, 1.0)
  mask = np.clip(out["t1"] * 8.0, 0.0, 1.0)  # soft brain mask
  tissue = np.clip(out["gm"] + out["wm"], 0.0, 1.0) * mask
  csf = np.clip(mask - tissue, 0.0, 1.0)
  depth = ndi.distance_transform_edt(mask > 0.5) / (max(shape) / 2.0)
  ventricles = csf * (depth > 0.35)
  grid = np.indices(shape, dtype=np.float32)
  weight = ventricles / ventricles.sum()
  centre = np.array([(g * weight).sum() for g in grid])
  spread = np.sqrt(np.array([(((g - c) ** 2) * weight).sum() for g, c in zip(grid, centre)]))
  csf_level = float(np.percentile(out["t1"][ventricles > 0.5], 10))
  return Template(
    t1=out["t1"],
    tissue=tissue,
    gm=out["gm"] * mask,
    mask=mask,
    ventricle_centre=centre,
    ventricle_sigma=2.0 * spread,
    csf_level=csf_level,
    spacing=spacing_xyz,
    origin=tuple(origin),
    direction=ref.GetDirection(),
  )


def _smooth_noise(
  rng: np.random.Generator, shape: Sequence[int], control: int, channels: int = 1
) -> np.ndarray:
  """Smooth random field(s) of unit scale: a coarse normal grid sampled by cubic splines."""
  coarse = rng.standard_normal((channels, control, control, control)).astype(np.float32)
  axes = [np.linspace(0.0, control - 1.0, s, dtype=np.float32) for s in shape]
  coords = np.stack(np.meshgrid(*axes, indexing="ij"))
  return np.stack([ndi.map_coordinates(c, coords, order=3, mode="nearest") for c in coarse])


def make_subject(template: Template, stage: int, seed: int) -> np.ndarray:
  """One synthetic T1 volume, float32 in [0, 1], of the template's shape."""
  if not 0 <= stage < NUM_STAGES:
    raise ValueError(f"stage must be in 0..{NUM_STAGES - 1}, got {stage}")
  rng = np.random.default_rng(seed)
  shape = template.t1.shape
  n = float(max(shape))
  severity = max(0.0, stage + rng.uniform(-0.3, 0.3))
  grid = np.indices(shape, dtype=np.float32)
  centre = (np.asarray(shape, np.float32) - 1) / 2
  # Backward map: output voxel p samples the template at q(p).
  rot = _small_rotation(rng, max_degrees=4.0)
  scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
  rel = grid - centre[:, None, None, None]
  q = np.einsum("ij,j...->i...", rot / scale[:, None], rel) + centre[:, None, None, None]
  q += _smooth_noise(rng, shape, control=5, channels=3) * (0.025 * n)
  vc = template.ventricle_centre[:, None, None, None]
  vs = template.ventricle_sigma[:, None, None, None]
  bump = np.exp(-0.5 * (((q - vc) / vs) ** 2).sum(0))
  q = vc + (q - vc) * (1.0 - 0.14 * severity * bump)  # shrink the source → ventricles grow
  warp = lambda a: ndi.map_coordinates(a, q, order=1, mode="constant", cval=0.0)
  t1, tissue, gm, mask = (
    warp(a) for a in (template.t1, template.tissue, template.gm, template.mask)
  )
  # Atrophy at tissue/CSF interfaces: the less tissue around a voxel, the more of it is lost.
  surround = ndi.gaussian_filter(tissue, sigma=0.015 * n)
  lost = (1.0 - np.clip((surround - 0.16 * severity) / 0.2, 0.0, 1.0)) * tissue
  t1 = t1 - lost * np.maximum(t1 - template.csf_level, 0.0)
  t1 = t1 * (1.0 + rng.uniform(-0.08, 0.08) * gm)  # GM/WM contrast
  t1 = np.clip(t1, 0.0, None) ** rng.uniform(0.85, 1.15)  # overall contrast
  t1 = t1 * np.exp(0.08 * _smooth_noise(rng, shape, control=4)[0])  # bias field
  sigma = rng.uniform(0.01, 0.03)
  noisy = np.sqrt(
    (t1 + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2
  )  # Rician noise
  out = noisy * (mask > 0.5)
  top = np.percentile(out[mask > 0.5], 99.5)
  return np.clip(out / top, 0.0, 1.0).astype(np.float32)


def _small_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
  angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
  mats = []
  for axis, a in enumerate(angles):
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    mats.append(m)
  return (mats[0] @ mats[1] @ mats[2]).astype(np.float32)


def subject_seeds(n: int, seed: int) -> np.ndarray:
  """The per-subject seeds of a cohort (stable: subject i's seed does not depend on n)."""
  return np.asarray([seed * 100_003 + i for i in range(n)], np.int64)


def cohort_stages(n: int, seed: int = 0, proportions: Sequence[float] | None = None) -> np.ndarray:
  """The stage of each of `n` subjects, int32 `(n,)`.

  `proportions` None: round-robin 0, 1, 2, 3, 0, ... Otherwise one non-negative weight per
  stage (normalised to sum 1): the counts are n * p rounded by largest remainder (so they sum
  to n and a stage with weight 0 gets none), in an order shuffled by `seed`.
  """
  if n < 1:
    raise ValueError(f"cohort size must be positive, got {n}")
  if proportions is None:
    return np.arange(n, dtype=np.int32) % NUM_STAGES
  p = np.asarray(proportions, np.float64)
  if p.shape != (NUM_STAGES,) or (p < 0).any() or p.sum() <= 0:
    raise ValueError(
      f"stage proportions must be {NUM_STAGES} non-negative weights with a "
      f"positive sum, got {list(proportions)}"
    )
  exact = n * p / p.sum()
  counts = np.floor(exact).astype(int)
  extra = np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]
  counts[extra] += 1
  stages = np.repeat(np.arange(NUM_STAGES, dtype=np.int32), counts)
  return np.random.default_rng(seed).permutation(stages).astype(np.int32)


def make_cohort(
  n: int,
  shape: Sequence[int] = (64, 64, 64),
  seed: int = 0,
  proportions: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Generates `n` subjects: volumes float32 [n, D, H, W] in [0, 1] and stage labels int32 [n].

  `proportions`: see `cohort_stages` (None: balanced, round-robin).
  """
  stages = cohort_stages(n, seed, proportions)
  template = load_template(tuple(int(s) for s in shape))
  seeds = subject_seeds(n, seed)
  volumes = np.stack([make_subject(template, int(s), int(k)) for s, k in zip(stages, seeds)])
  return volumes, stages


def write_cohort(
  directory: str,
  n: int,
  shape: Sequence[int] = (64, 64, 64),
  seed: int = 0,
  proportions: Sequence[float] | None = None,
) -> str:
  """Writes the cohort as NIfTI files plus `manifest.csv` (file, stage, seed); returns the path.

  An existing directory written with the same (n, shape, seed, proportions) is reused; any other
  non-empty directory is refused so that nothing is overwritten. The files are written into a
  temporary folder renamed to `directory` when complete, so an interrupted write blocks nothing.
  """
  spec = {"n": int(n), "shape": [int(s) for s in shape], "seed": int(seed)}
  if proportions is not None:
    spec["proportions"] = [float(p) for p in proportions]
  spec_path = os.path.join(directory, "cohort.json")
  if os.path.isdir(directory) and os.listdir(directory):
    if os.path.isfile(spec_path):
      with open(spec_path) as f:
        if json.load(f) == spec and os.path.isfile(os.path.join(directory, "manifest.csv")):
          return directory
    raise VolumeError(f"{directory}: not empty and not a cohort with {spec}; refusing to write")
  volumes, stages = make_cohort(n, shape, seed, proportions)
  template = load_template(tuple(int(s) for s in shape))
  with atomic_write.atomic_dir(directory) as partial:  # an interrupted write leaves no cohort/
    rows = []
    for i, (vol, stage, subject_seed) in enumerate(zip(volumes, stages, subject_seeds(n, seed))):
      name = f"subject_{i:04d}.nii.gz"
      write_volume(
        os.path.join(partial, name),
        Volume(vol, template.spacing, template.origin, template.direction),
      )
      rows.append((name, int(stage), int(subject_seed)))
    with open(os.path.join(partial, "manifest.csv"), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["file", "stage", "seed"])
      writer.writerows(rows)
    with open(os.path.join(partial, "cohort.json"), "w") as f:
      json.dump(spec, f)
  return directory

"""The physical geometry of preprocessed volumes, and of the samples written from them.

Preprocessing crops a scan to the head, pads it to a cube and resizes the cube to the model
shape, so a model voxel is `input spacing * cube side / model side` mm on each axis (a 180 mm
head at 64³ has voxels of about 2.8 mm, not 1 mm). The array axes keep the input's index order,
so the volumes keep the input's direction cosines.

A training set's `Geometry` is the median voxel size of its volumes and the direction most of
them share; it is recorded as `geometry.json` in the VQ-GAN's workdir, and samples are written
with it and with a centred origin (the volume's centre at 0 mm), so that ITK-SNAP and 3D Slicer
show them at their physical size and in the cohort's orientation.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from latentfm import atomic_write
from latentfm.data.io import Volume

GEOMETRY_FILE = "geometry.json"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Voxel size in mm and direction cosines, both in SimpleITK's (x, y, z) order.

  `num_volumes` is how many volumes it summarises and `agreeing` how many of them have
  `direction` (0 for a geometry that summarises none).
  """

  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
  direction: tuple[float, ...] = IDENTITY
  num_volumes: int = 0
  agreeing: int = 0

  @property
  def orientation(self) -> str:
    """ITK's three-letter orientation code of `direction`, e.g. "LPS" for the identity."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction)

  def describe(self) -> str:
    """One line: voxel size, orientation and how many volumes agree."""
    mm = " x ".join(f"{s:.3g}" for s in self.spacing)
    text = f"voxel size {mm} mm (x, y, z), orientation {self.orientation}"
    if self.num_volumes:
      text += (
        f"; median of {self.num_volumes} training volumes, {self.agreeing} of them in "
        "that orientation"
      )
    return text

  def volume(self, array: np.ndarray) -> Volume:
    """`array` (D, H, W) as a `Volume` with this geometry and its centre at (0, 0, 0) mm."""
    array = np.asarray(array, np.float32)
    half_extent = (np.asarray(array.shape[::-1], float) - 1) / 2 * np.asarray(self.spacing)
    origin = -np.asarray(self.direction, float).reshape(3, 3) @ half_extent
    return Volume(
      array=array,
      spacing=tuple(float(s) for s in self.spacing),
      origin=tuple(float(o) for o in origin),
      direction=tuple(self.direction),
    )

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "orientation": self.orientation}

  @classmethod
  def from_dict(cls, d: dict) -> "Geometry":
    return cls(
      spacing=tuple(float(s) for s in d["spacing"]),
      direction=tuple(float(c) for c in d["direction"]),
      num_volumes=int(d.get("num_volumes", 0)),
      agreeing=int(d.get("agreeing", 0)),
    )


def isotropic(spacing: float = 1.0) -> Geometry:
  """`spacing` mm on every axis, identity direction."""
  return Geometry(spacing=(float(spacing),) * 3)


def preprocessed_spacing(
  spacing_xyz: Sequence[float], cube_side: int, shape: Sequence[int]
) -> tuple[float, float, float]:
  """Voxel size (x, y, z) in mm after a volume of `spacing_xyz` mm voxels was padded or cropped
  to a cube of `cube_side` voxels and resized to `shape` (D, H, W)."""
  shape_xyz = np.asarray(shape[::-1], float)
  return tuple(float(s) for s in np.asarray(spacing_xyz, float) * cube_side / shape_xyz)


def summarise(spacings: np.ndarray, directions: np.ndarray) -> Geometry:
  """A set's geometry from its volumes' voxel sizes `(N, 3)` and directions `(N, 9)`.

  The voxel size is the per-axis median; the direction is the one most volumes share (compared
  after rounding to 1e-3). Mixed directions are logged: their arrays are not aligned with each
  other, since preprocessing keeps each file's index order.
  """
  spacings, directions = np.asarray(spacings, float), np.asarray(directions, float)
  if len(spacings) == 0 or spacings.shape[1:] != (3,) or directions.shape != (len(spacings), 9):
    raise ValueError(
      f"need (N, 3) spacings and (N, 9) directions, N > 0; got "
      f"{spacings.shape} and {directions.shape}"
    )
  keys = [tuple(np.round(d, 3) + 0.0) for d in directions]
  counts = collections.Counter(keys)
  key, agreeing = counts.most_common(1)[0]
  if len(counts) > 1:
    _log.warning(
      "the volumes have %d different orientations; samples are written in the "
      "commonest, that of %d of %d volumes",
      len(counts),
      agreeing,
      len(keys),
    )
  first = directions[keys.index(key)]
  return Geometry(
    spacing=tuple(float(s) for s in np.median(spacings, axis=0)),
    direction=tuple(float(c) for c in first),
    num_volumes=len(keys),
    agreeing=agreeing,
  )


def write(workdir: str, geometry: Geometry) -> None:
  """Records `geometry` as `workdir/geometry.json` (atomically)."""
  atomic_write.write_text(
    os.path.join(workdir, GEOMETRY_FILE), json.dumps(geometry.to_dict(), indent=1) + "\n"
  )


def read(workdir: str) -> Geometry | None:
  """The geometry recorded in `workdir`, or None if none was (workdirs of older versions)."""
  path = os.path.join(workdir, GEOMETRY_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return Geometry.from_dict(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a geometry record ({e})") from None

"""Reading and writing 3D volumes (NIfTI, MHA, NRRD) with SimpleITK.

A `Volume` holds the voxel array in (D, H, W) = (z, y, x) order, float32, together with the
physical geometry SimpleITK reports in (x, y, z) order, so that a volume read and written back
keeps its place in scanner space and opens correctly in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Sequence

import numpy as np
import SimpleITK as sitk

SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


class VolumeError(ValueError):
  """A volume file cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Volume:
  """A 3D scalar image: `array` is float32 (D, H, W); geometry is in SimpleITK (x, y, z) order."""

  array: np.ndarray
  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
  origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
  direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

  def replace(self, **changes) -> "Volume":
    return dataclasses.replace(self, **changes)


def is_volume_file(path: str | os.PathLike) -> bool:
  """Whether `path` has one of the supported volume suffixes."""
  name = os.fspath(path).lower()
  return any(name.endswith(s) for s in SUFFIXES)


def read_volume(path: str | os.PathLike) -> Volume:
  """Reads a 3D scalar volume; raises `VolumeError` naming the file for anything unusable."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise VolumeError(f"{path}: no such file")
  try:
    _check_not_truncated(path)
    image = sitk.ReadImage(path)
  except RuntimeError as e:  # SimpleITK reports unreadable/truncated files this way.
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
    raise VolumeError(f"{path}: cannot read volume ({reason[:160]})") from None
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise VolumeError(f"{path}: expected a scalar image, got "
                      f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
  dim = image.GetDimension()
  size = image.GetSize()
  if dim == 4 and size[3] == 1:
    image = image[:, :, :, 0]
  elif dim != 3:
    raise VolumeError(f"{path}: expected a 3D volume, got a {dim}D image of size {size}")
  array = sitk.GetArrayFromImage(image).astype(np.float32)
  if min(array.shape) < 2:
    raise VolumeError(f"{path}: expected a 3D volume, got size {image.GetSize()}")
  check_finite_nonconstant(array, path)
  return Volume(array=array, spacing=tuple(image.GetSpacing()), origin=tuple(image.GetOrigin()),
                direction=tuple(image.GetDirection()))


def _check_not_truncated(path: str) -> None:
  """Raises `VolumeError` if an uncompressed file is shorter than its header says.

  SimpleITK silently zero-fills truncated uncompressed NIfTI/MHA/NRRD data.
  """
  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  reader.ReadImageInformation()
  lower = path.lower()
  if lower.endswith(".gz"):
    try:
      with gzip.open(path, "rb") as f:
        while f.read(1 << 24):
          pass
    except (EOFError, OSError, zlib.error) as e:
      raise VolumeError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return
  if lower.endswith(".mhd"):
    return  # the voxel data lives in another file
  with open(path, "rb") as f:
    head = f.read(4096)
  text = head.decode("latin-1")
  if lower.endswith(".mha") and "CompressedData = True" in text:
    return
  if lower.endswith(".nrrd") and any(f"encoding: {e}" in text for e in ("gz", "bz", "gzip")):
    return
  pixel = sitk.Image(1, 1, 1, reader.GetPixelID())
  itemsize = sitk.GetArrayViewFromImage(pixel).itemsize
  n_bytes = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * itemsize
  size = os.path.getsize(path)
  if size < n_bytes:
    raise VolumeError(f"{path}: truncated file ({size} bytes for {n_bytes} bytes of voxel data)")


def check_finite_nonconstant(array: np.ndarray, name: str) -> None:
  """Raises `VolumeError` if `array` holds NaN/Inf or a single value."""
  if not np.all(np.isfinite(array)):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise VolumeError(f"{name}: volume contains {bad} NaN/Inf voxels")
  if float(array.max()) == float(array.min()):
    raise VolumeError(f"{name}: volume is constant (all voxels = {float(array.min()):g})")


def write_volume(path: str | os.PathLike, volume: Volume | np.ndarray,
                 spacing: Sequence[float] | None = None) -> None:
  """Writes a volume (or a bare (D, H, W) array, with `spacing` in mm) to NIfTI/MHA/NRRD."""
  path = os.fspath(path)
  if not is_volume_file(path):
    raise VolumeError(f"{path}: unsupported suffix; use one of {', '.join(SUFFIXES)}")
  if not isinstance(volume, Volume):
    volume = Volume(array=np.asarray(volume, np.float32))
    if spacing is not None:
      volume = volume.replace(spacing=tuple(float(s) for s in spacing))
  if volume.array.ndim != 3:
    raise VolumeError(f"{path}: expected a (D, H, W) array, got shape {volume.array.shape}")
  image = sitk.GetImageFromArray(np.asarray(volume.array, np.float32))
  image.SetSpacing(volume.spacing)
  image.SetOrigin(volume.origin)
  image.SetDirection(volume.direction)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sitk.WriteImage(image, path, useCompression=path.lower().endswith(".gz"))

"""Reading and writing 3D volumes (NIfTI, MHA, NRRD) with SimpleITK.

A `Volume` holds the voxel array in (D, H, W) = (z, y, x) order, float32, together with the
physical geometry SimpleITK reports in (x, y, z) order, so that a volume read and written back
keeps its place in scanner space and opens correctly in ITK-SNAP or 3D Slicer.

NIfTI voxels are read with nibabel: SimpleITK's NIfTI reader turns NaN/Inf into 0 without a
word (FSL and SPM write NaN outside brain masks), and it refuses files whose direction cosines
are orthonormal only up to float rounding; those are read with the nearest orthonormal
direction and a one-line warning giving the deviation.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from typing import Sequence
import zlib

import numpy as np
import SimpleITK as sitk

from latentfm import atomic_write

SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
NONFINITE_POLICIES = ("reject", "zero")
# Largest |direction - nearest orthonormal direction| read as float rounding (about 0.6°).
MAX_DIRECTION_DEVIATION = 1e-2
_log = logging.getLogger(__name__)


class VolumeError(ValueError):
  """A volume file cannot be used; the message names the file and the problem."""


class ManyErrors(VolumeError):
  """Several problems at once: a first line saying what, then one line per item."""

  def __init__(self, headline: str, lines: Sequence[str]):
    super().__init__("\n".join([headline, *(f"  {l}" for l in lines)]))
    self.lines = tuple(lines)


@dataclasses.dataclass(frozen=True)
class Volume:
  """A 3D scalar image: `array` is float32 (D, H, W); geometry is in SimpleITK (x, y, z) order."""

  array: np.ndarray
  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
  origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
  direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

  def replace(self, **changes) -> "Volume":
    """A copy with some fields changed.

    Args:
      **changes: new values of `array`, `spacing`, `origin` or `direction`.
    Returns:
      A new `Volume`; this one is unchanged.
    """
    return dataclasses.replace(self, **changes)


def is_volume_file(path: str | os.PathLike) -> bool:
  """Whether a file name is a volume this module reads and writes.

  Args:
    path: a file name or path (str or path-like).
  Returns:
    True if it ends in one of `SUFFIXES`, case-insensitively.
  """
  name = os.fspath(path).lower()
  return any(name.endswith(s) for s in SUFFIXES)


def read_volume(path: str | os.PathLike, nonfinite: str = "reject") -> Volume:
  """Reads a 3D scalar volume (a 4D file with one time point counts as 3D).

  Args:
    path: a NIfTI (.nii, .nii.gz), MHA/MHD or NRRD file.
    nonfinite: NaN/Inf voxels are an error ("reject") or become 0 with a logged count ("zero").

  Returns:
    A `Volume`: float32 `array` (D, H, W), at least 2 voxels per axis, finite and not constant,
    in the file's intensity units; `spacing` (mm), `origin` and `direction` in (x, y, z) order.

  Raises:
    VolumeError: naming the file, for a missing, truncated, unreadable, non-scalar, non-3D,
      non-finite (with "reject") or constant volume.
  """
  path = os.fspath(path)
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
  if not os.path.isfile(path):
    raise VolumeError(f"{path}: no such file")
  lower = path.lower()
  volume = _read_nifti(path) if lower.endswith((".nii", ".nii.gz")) else _read_itk(path)
  if min(volume.array.shape) < 2:
    raise VolumeError(f"{path}: expected a 3D volume, got size {volume.array.shape[::-1]}")
  finite = np.isfinite(volume.array)
  if nonfinite == "zero" and not finite.all():
    bad = int(finite.size - np.count_nonzero(finite))
    _log.warning("%s: replaced %d NaN/Inf voxels with 0", path, bad)
    volume = volume.replace(array=np.where(finite, volume.array, np.float32(0)))
  check_finite_nonconstant(volume.array, path)
  return volume


def _read_itk(path: str) -> Volume:
  try:
    _check_not_truncated(path)
    image = sitk.ReadImage(path)
  except RuntimeError as e:  # SimpleITK reports unreadable/truncated files this way.
    raise VolumeError(f"{path}: cannot read volume ({_last_line(e)})") from None
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise VolumeError(
      f"{path}: expected a scalar image, got "
      f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
    )
  dim = image.GetDimension()
  size = image.GetSize()
  if dim == 4 and size[3] == 1:
    image = image[:, :, :, 0]
  elif dim != 3:
    raise VolumeError(f"{path}: expected a 3D volume, got a {dim}D image of size {size}")
  return Volume(
    array=sitk.GetArrayFromImage(image).astype(np.float32),
    spacing=tuple(image.GetSpacing()),
    origin=tuple(image.GetOrigin()),
    direction=tuple(image.GetDirection()),
  )


def _last_line(e: Exception) -> str:
  text = str(e).strip()
  return (text.splitlines()[-1] if text else "unreadable")[:160]


def _read_nifti(path: str) -> Volume:
  """Voxels through nibabel (NaN kept), geometry as SimpleITK reports it where it can."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel

  try:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
  except Exception as e:  # pylint: disable=broad-except  # nibabel, gzip and zlib errors
    raise VolumeError(f"{path}: cannot read volume ({_last_line(e)})") from None
  if data.dtype.fields is not None or np.iscomplexobj(data):
    raise VolumeError(f"{path}: expected a scalar image, got voxels of type {data.dtype}")
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  elif data.ndim != 3:
    raise VolumeError(
      f"{path}: expected a 3D volume, got a {data.ndim}D image of size {data.shape}"
    )
  array = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32)
  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    if "orthonormal" not in str(e):
      raise VolumeError(f"{path}: cannot read volume ({_last_line(e)})") from None
    return _orthonormalised(path, array, image.affine)
  n = reader.GetDimension()
  direction = np.asarray(reader.GetDirection()).reshape(n, n)[:3, :3]
  return Volume(
    array=array,
    spacing=tuple(reader.GetSpacing()[:3]),
    origin=tuple(reader.GetOrigin()[:3]),
    direction=tuple(direction.ravel()),
  )


def _orthonormalised(path: str, array: np.ndarray, affine: np.ndarray) -> Volume:
  """A volume whose NIfTI affine (RAS) is nearly orthonormal, in ITK's LPS geometry."""
  lps = np.diag([-1.0, -1.0, 1.0])
  matrix = lps @ np.asarray(affine, float)[:3, :3]
  spacing = np.linalg.norm(matrix, axis=0)
  cosines = matrix / spacing
  u, _, vt = np.linalg.svd(cosines)
  nearest = u @ vt
  deviation = float(np.abs(cosines - nearest).max())
  if deviation > MAX_DIRECTION_DEVIATION or np.linalg.det(nearest) == 0:
    raise VolumeError(
      f"{path}: direction cosines are not orthonormal (deviation {deviation:.2g}"
      f" > {MAX_DIRECTION_DEVIATION:g}); resample it to an orthonormal grid"
    )
  _log.warning(
    "%s: direction cosines deviate from orthonormal by %.2g; read with the nearest "
    "orthonormal ones",
    path,
    deviation,
  )
  return Volume(
    array=array,
    spacing=tuple(float(s) for s in spacing),
    origin=tuple(float(o) for o in lps @ np.asarray(affine, float)[:3, 3]),
    direction=tuple(float(d) for d in nearest.ravel()),
  )


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
  """Checks that a volume's voxels are finite and not all equal.

  Args:
    array: the voxels, any shape.
    name: the file (or other source) the error message names.
  Returns:
    None; raises `VolumeError` naming `name` if `array` holds NaN/Inf or a single value.
  """
  if not np.all(np.isfinite(array)):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise VolumeError(f"{name}: volume contains {bad} NaN/Inf voxels")
  if float(array.max()) == float(array.min()):
    raise VolumeError(f"{name}: volume is constant (all voxels = {float(array.min()):g})")


def write_volume(
  path: str | os.PathLike, volume: Volume | np.ndarray, spacing: Sequence[float] | None = None
) -> None:
  """Writes a volume to NIfTI/MHA/NRRD (the suffix decides; .gz compresses), making directories.

  Args:
    path: the file to write, with one of `SUFFIXES`.
    volume: a `Volume`, or a bare (D, H, W) array (any values; written as float32).
    spacing: (x, y, z) voxel size in mm for a bare array (default 1 mm); ignored for a `Volume`.
  Returns:
    None. The file appears under `path` only once complete (written to a temporary name first).
  Raises:
    VolumeError: naming the file, for an unsupported suffix or an array that is not 3D.
  """
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
  with atomic_write.atomic_path(path) as partial:  # never half a file under the final name
    sitk.WriteImage(image, partial, useCompression=path.lower().endswith(".gz"))

"""The thesis preprocessing pipeline as small composable functions.

resample (SimpleITK, to a target spacing) → normalise intensities to [0, 1] (percentile clip)
→ crop to the foreground (cuts non-brain background) → pad/crop to a cube → resize to the model
shape. Training adds random flips and an intensity scaling. Arrays are (D, H, W) float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

from latentfm.data.geometry import preprocessed_spacing
from latentfm.data.io import Volume, VolumeError, check_finite_nonconstant


def resample(
  volume: Volume, spacing: float | Sequence[float] = 1.0, *, linear: bool = True
) -> Volume:
  """Resamples to `spacing` mm (scalar = isotropic), keeping origin, direction and extent."""
  new_spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
  old_spacing = np.asarray(volume.spacing, float)
  if np.allclose(new_spacing, old_spacing):
    return volume
  image = sitk.GetImageFromArray(volume.array)
  image.SetSpacing(volume.spacing)
  image.SetOrigin(volume.origin)
  image.SetDirection(volume.direction)
  old_size = np.asarray(image.GetSize(), float)
  new_size = [max(1, int(round(s))) for s in old_size * old_spacing / new_spacing]
  interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
  out = sitk.Resample(
    image,
    new_size,
    sitk.Transform(),
    interpolator,
    volume.origin,
    tuple(new_spacing),
    volume.direction,
    0.0,
    sitk.sitkFloat32,
  )
  return Volume(
    array=sitk.GetArrayFromImage(out),
    spacing=tuple(float(s) for s in new_spacing),
    origin=volume.origin,
    direction=volume.direction,
  )


def normalize_intensity(array: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
  """Maps the [lower, upper] percentiles of the non-background voxels to [0, 1], clipping."""
  array = np.asarray(array, np.float32)
  foreground = array[array > array.min()]
  if foreground.size == 0:
    raise VolumeError("cannot normalise a constant volume")
  lo, hi = np.percentile(foreground, [lower, upper])
  if hi <= lo:
    raise VolumeError("cannot normalise: intensity percentiles coincide")
  return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def foreground_box(
  array: np.ndarray, threshold: float = 0.05, margin: int = 1
) -> tuple[slice, slice, slice]:
  """Bounding box (with `margin` voxels) of voxels above `threshold`."""
  mask = np.asarray(array) > threshold
  if not mask.any():
    raise VolumeError(f"no voxel above the foreground threshold {threshold}")
  box = []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    box.append(slice(max(0, idx[0] - margin), min(mask.shape[axis], idx[-1] + 1 + margin)))
  return tuple(box)


def crop_foreground(array: np.ndarray, threshold: float = 0.05, margin: int = 1) -> np.ndarray:
  """Crops to the bounding box of the foreground (the thesis' non-brain cut)."""
  return np.asarray(array)[foreground_box(array, threshold, margin)]


def pad_or_crop_to_cube(
  array: np.ndarray, side: int | None = None, value: float = 0.0
) -> np.ndarray:
  """Centres the volume in a cube of `side` (default: its largest extent), padding with `value`."""
  array = np.asarray(array)
  side = max(array.shape) if side is None else int(side)
  out = np.full((side,) * 3, value, dtype=array.dtype)
  src, dst = [], []
  for n in array.shape:
    if n >= side:
      start = (n - side) // 2
      src.append(slice(start, start + side))
      dst.append(slice(0, side))
    else:
      start = (side - n) // 2
      src.append(slice(0, n))
      dst.append(slice(start, start + n))
  out[tuple(dst)] = array[tuple(src)]
  return out


def resize(array: np.ndarray, shape: Sequence[int], antialias: bool = True) -> np.ndarray:
  """Linear resize to `shape`; Gaussian prefilter when shrinking so that thin structures survive."""
  array = np.asarray(array, np.float32)
  shape = tuple(int(s) for s in shape)
  if array.shape == shape:
    return array
  factors = np.asarray(shape, float) / np.asarray(array.shape, float)
  if antialias and np.any(factors < 1):
    sigma = np.where(factors < 1, 0.5 * (1 / factors - 1) ** 0.5, 0.0)
    array = ndi.gaussian_filter(array, sigma, mode="nearest")
  out = ndi.zoom(array, factors, order=1, mode="nearest", grid_mode=True)
  if out.shape != shape:  # guard against rounding in zoom's output size
    out = pad_or_crop_to_cube(out, max(shape))[tuple(slice(0, s) for s in shape)]
  return out.astype(np.float32)


def preprocess_volume(
  volume: Volume,
  shape: Sequence[int] = (64, 64, 64),
  spacing: float | None = 1.0,
  name: str = "volume",
) -> np.ndarray:
  """The whole pipeline: a raw `Volume` → float32 array of `shape` in [0, 1]."""
  return preprocess_with_spacing(volume, shape, spacing, name)[0]


def preprocess_with_spacing(
  volume: Volume,
  shape: Sequence[int] = (64, 64, 64),
  spacing: float | None = 1.0,
  name: str = "volume",
) -> tuple[np.ndarray, tuple[float, float, float]]:
  """`preprocess_volume`, and the physical size of its output voxels.

  Returns:
    The float32 array of `shape` (D, H, W) in [0, 1], and its voxel size in mm in SimpleITK's
    (x, y, z) order (see `geometry.preprocessed_spacing`).
  """
  check_finite_nonconstant(volume.array, name)
  if spacing is not None:
    volume = resample(volume, spacing)
  try:
    array = normalize_intensity(volume.array)
    array = crop_foreground(array)
  except VolumeError as e:
    raise VolumeError(f"{name}: {e}") from None
  array = pad_or_crop_to_cube(array)
  voxel_mm = preprocessed_spacing(volume.spacing, array.shape[0], shape)
  return np.clip(resize(array, shape), 0.0, 1.0), voxel_mm


def augment(
  array: np.ndarray,
  rng: np.random.Generator,
  flip_axes: Sequence[int] = (2,),
  intensity_range: tuple[float, float] = (0.7, 1.0),
) -> np.ndarray:
  """Random flips (p = 0.5 per axis in `flip_axes`) and intensity scaling by U(*intensity_range)."""
  out = np.asarray(array)
  for axis in flip_axes:
    if rng.random() < 0.5:
      out = np.flip(out, axis=axis)
  scale = rng.uniform(*intensity_range)
  return np.ascontiguousarray(out * np.float32(scale), dtype=np.float32)


def train_val_split(
  n: int, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic split of `range(n)` by `seed` into sorted train and validation indices."""
  if n < 2:
    raise ValueError(f"need at least 2 volumes to split into train and validation, got {n}")
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  order = np.random.default_rng(seed).permutation(n)
  n_val = min(n - 1, max(1, int(round(n * val_fraction))))
  return np.sort(order[n_val:]), np.sort(order[:n_val])

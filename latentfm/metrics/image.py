"""Batched, jittable image-quality metrics for 3D volumes.

Every metric takes two batches of volumes shaped ``(B, D, H, W)`` or
``(B, D, H, W, 1)`` and returns one value per volume, shape ``(B,)``. Inputs
are promoted to at least float32. ``data_range`` is the dynamic range of the
intensities (1.0 for volumes in [0, 1]).

SSIM conventions. The Gaussian window is separable and truncated to
``win_size`` taps per axis (normalised to sum 1), and the SSIM map is averaged
over the VALID region only, i.e. over the voxels whose whole window lies
inside the volume. This is exactly what both reference implementations
compute:

* ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False)`` filters the full volume with
  ``scipy.ndimage.gaussian_filter(mode='reflect', truncate=3.5)`` and then
  crops ``(win_size - 1) // 2`` voxels from every border before averaging.
  When ``win_size == 2 * int(3.5 * sigma + 0.5) + 1`` (its default, 11 for
  sigma 1.5) the crop equals the filter radius, so the reflected border never
  reaches the averaged voxels and the result equals a valid-mode filter.
* ``pytorch_msssim`` uses a valid-mode Gaussian convolution directly.

Both use population (not sample) covariances, as does this module.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from latentfm.train import compiler

Array = jax.Array

# Wang, Simoncelli & Bovik (2003), finest to coarsest scale.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _prepare(x, y) -> tuple[Array, Array]:
  """Validates shapes and returns float ``(B, D, H, W)`` arrays."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"Shape mismatch: {x.shape} vs {y.shape}.")
  if x.ndim == 5 and x.shape[-1] == 1:
    x, y = x[..., 0], y[..., 0]
  if x.ndim != 4:
    raise ValueError(f"Expected (B, D, H, W) or (B, D, H, W, 1) volumes, got {x.shape}.")
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  return x.astype(dtype), y.astype(dtype)


def _mean_per_volume(a: Array) -> Array:
  return jnp.mean(a, axis=tuple(range(1, a.ndim)))


@compiler.jit
def mse(x: Array, y: Array) -> Array:
  """Mean squared error per volume.

  Args:
    x, y: volumes ``(B, D, H, W)`` or ``(B, D, H, W, 1)`` of the same shape, any range.
  Returns:
    ``(B,)`` values >= 0, in squared intensity units.
  """
  x, y = _prepare(x, y)
  return _mean_per_volume(jnp.square(x - y))


@compiler.jit
def nmse(x: Array, y: Array) -> Array:
  """Normalised MSE ``||x - y||^2 / ||y||^2`` per volume, shape ``(B,)``.

  ``y`` is the reference (the real volume), ``x`` the prediction or sample;
  the metric is not symmetric. A perfect reconstruction gives 0 and ``x = 0``
  gives 1; unpaired comparisons (a generated sample against an unrelated real
  volume) are routinely above 1.

  Args:
    x, y: volumes ``(B, D, H, W)`` or ``(B, D, H, W, 1)``; ``y`` not all zero.
  Returns:
    ``(B,)`` values >= 0.
  """
  x, y = _prepare(x, y)
  axes = tuple(range(1, x.ndim))
  return jnp.sum(jnp.square(x - y), axis=axes) / jnp.sum(jnp.square(y), axes)


@compiler.jit
def psnr(x: Array, y: Array, data_range: float = 1.0) -> Array:
  """Peak signal-to-noise ratio ``10 log10(data_range^2 / mse)`` in dB.

  Args:
    x, y: volumes ``(B, D, H, W)`` or ``(B, D, H, W, 1)``, intensities in [0, data_range].
    data_range: the intensities' range (1 for volumes in [0, 1]).
  Returns:
    ``(B,)`` PSNR in dB; identical volumes give ``inf``.
  """
  return 10.0 * jnp.log10(jnp.square(data_range) / mse(x, y))


def gaussian_window(win_size: int, sigma: float) -> np.ndarray:
  """The SSIM window: a centred, normalised 1D Gaussian.

  Args:
    win_size: taps, a positive odd integer (a ValueError otherwise).
    sigma: the Gaussian's standard deviation in voxels, > 0.
  Returns:
    float64 ``(win_size,)`` weights in (0, 1] summing to 1.
  """
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be a positive odd integer, got {win_size}.")
  t = np.arange(win_size, dtype=np.float64) - (win_size - 1) // 2
  g = np.exp(-0.5 * np.square(t / sigma))
  return g / g.sum()


def _filter_valid(z: Array, window: np.ndarray) -> Array:
  """Separable valid-mode filtering of the last three axes of ``z``."""
  k = len(window)
  for axis in range(z.ndim - 3, z.ndim):
    n = z.shape[axis] - k + 1
    z = sum(float(w) * lax.slice_in_dim(z, i, i + n, axis=axis) for i, w in enumerate(window))
  return z


def _ssim_and_cs(
  x: Array, y: Array, data_range, window: np.ndarray, k1: float, k2: float
) -> tuple[Array, Array]:
  """Mean SSIM and mean contrast-structure term over the valid region."""
  k = len(window)
  if min(x.shape[1:]) < k:
    raise ValueError(f"win_size {k} exceeds the volume extent {x.shape[1:]}.")
  stats = jnp.stack([x, y, x * x, y * y, x * y], axis=1)  # (B, 5, D, H, W)
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.moveaxis(_filter_valid(stats, window), 1, 0)
  var_x = e_xx - mu_x * mu_x
  var_y = e_yy - mu_y * mu_y
  cov = e_xy - mu_x * mu_y
  c1 = jnp.square(k1 * data_range)
  c2 = jnp.square(k2 * data_range)
  cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
  lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  return _mean_per_volume(lum_map * cs_map), _mean_per_volume(cs_map)


@functools.partial(compiler.jit, static_argnames=("sigma", "win_size", "k1", "k2", "return_cs"))
def ssim(
  x: Array,
  y: Array,
  data_range: float = 1.0,
  sigma: float = 1.5,
  win_size: int = 11,
  k1: float = 0.01,
  k2: float = 0.03,
  return_cs: bool = False,
) -> Array | tuple[Array, Array]:
  """3D SSIM per volume (Gaussian window, mean over the valid region).

  Matches ``skimage.metrics.structural_similarity(x, y, data_range=...,
  gaussian_weights=True, sigma=sigma, use_sample_covariance=False)`` whenever
  ``win_size == 2 * int(3.5 * sigma + 0.5) + 1`` (the defaults do), and
  ``pytorch_msssim.ssim`` for any window that fits (see the module docstring).

  Args:
    x, y: volumes ``(B, D, H, W)`` or ``(B, D, H, W, 1)``; symmetric in x, y.
    data_range: intensity range, sets ``C1 = (k1 R)^2`` and ``C2 = (k2 R)^2``.
    sigma: Gaussian standard deviation in voxels.
    win_size: odd window length per axis, at most the smallest side.
    k1, k2: stabilising constants.
    return_cs: also return the mean contrast-structure term (for MS-SSIM).

  Returns:
    SSIM of shape ``(B,)``, or ``(ssim, cs)`` if ``return_cs``.
  """
  x, y = _prepare(x, y)
  s, cs = _ssim_and_cs(x, y, data_range, gaussian_window(win_size, sigma), k1, k2)
  return (s, cs) if return_cs else s


def ms_ssim_scales(
  spatial_shape: Sequence[int], win_size: int = 11, max_scales: int = 5
) -> tuple[int, int]:
  """The ``(num_scales, win_size)`` that :func:`ms_ssim` uses for a shape.

  ``num_scales`` is the largest ``s <= max_scales`` such that the window still
  fits at scale ``s``, i.e. every side after ``s - 1`` halvings (each rounded
  down) is ``>= win_size``. If not even the full-resolution volume fits the
  window, one scale is used with the window shrunk to the largest odd size
  ``<= min(spatial_shape)``. For ``win_size=11``: 64^3 -> 3 scales,
  128^3 -> 4, 176^3 -> 5; 8^3 -> 1 scale with a 7-voxel window.

  Args:
    spatial_shape: the (D, H, W) of the volumes, each >= 1.
    win_size: the requested window, odd.
    max_scales: the most scales, the length of the weights (5 by default).
  Returns:
    ``(num_scales, win_size)``: 1 <= num_scales <= max_scales, and the odd window used.
  """
  sides = [int(n) for n in spatial_shape]
  if min(sides) < 1:
    raise ValueError(f"Empty spatial shape {tuple(sides)}.")
  if min(sides) < win_size:
    return 1, min(sides) - (1 - min(sides) % 2)
  scales = 1
  while scales < max_scales and min(sides) // 2 >= win_size:
    sides = [n // 2 for n in sides]
    scales += 1
  return scales, win_size


def _avg_pool2(x: Array) -> Array:
  """2x average pooling of the last three axes; odd trailing voxels dropped."""
  b, d, h, w = x.shape
  x = x[:, : d // 2 * 2, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(2, 4, 6))


@functools.partial(compiler.jit, static_argnames=("sigma", "win_size", "k1", "k2", "weights"))
def ms_ssim(
  x: Array,
  y: Array,
  data_range: float = 1.0,
  sigma: float = 1.5,
  win_size: int = 11,
  k1: float = 0.01,
  k2: float = 0.03,
  weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> Array:
  """3D multi-scale SSIM per volume (Wang et al. 2003).

  ``MS-SSIM = prod_{j<M} relu(cs_j)^{w_j} * relu(ssim_M)^{w_M}``, where scale
  ``j + 1`` is a 2x average pool of scale ``j`` (odd trailing voxels are
  dropped) and ``cs_j`` / ``ssim_j`` are the valid-region means of
  :func:`ssim`. The clipping at 0 follows ``pytorch_msssim`` and keeps the
  fractional powers real.

  Scale/window rule (see :func:`ms_ssim_scales`): ``M`` is the largest number
  of scales ``<= len(weights)`` at which the ``win_size`` window still fits
  the coarsest volume; if fewer than ``len(weights)`` scales fit, the first
  ``M`` weights are renormalised to sum to 1 (otherwise they are used as
  given). Volumes smaller than the window use one scale and the largest odd
  window that fits. With all scales fitting and even sides at every pooling
  step this equals ``pytorch_msssim.ms_ssim`` with the same weights.

  Args:
    x, y: volumes ``(B, D, H, W)`` or ``(B, D, H, W, 1)``.
    data_range: intensity range of the inputs.
    sigma, win_size, k1, k2: as in :func:`ssim`.
    weights: per-scale exponents, finest first (a hashable tuple).

  Returns:
    MS-SSIM of shape ``(B,)``.
  """
  x, y = _prepare(x, y)
  num_scales, win = ms_ssim_scales(x.shape[1:], win_size, len(weights))
  w = np.asarray(weights[:num_scales], dtype=np.float64)
  if num_scales < len(weights):
    w = w / w.sum()
  window = gaussian_window(win, sigma)
  result = jnp.ones(x.shape[:1], x.dtype)
  for j in range(num_scales):
    s, cs = _ssim_and_cs(x, y, data_range, window, k1, k2)
    term = s if j == num_scales - 1 else cs
    result = result * jnp.maximum(term, 0.0) ** float(w[j])
    if j < num_scales - 1:
      x, y = _avg_pool2(x), _avg_pool2(y)
  return result

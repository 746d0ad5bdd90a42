"""Feature extractors and morphometric measures for distribution-level metrics.

A :data:`FeatureExtractor` is any callable that maps a batch of volumes
``[N, D, H, W]`` (float, in [0, 1]) to feature vectors ``[N, F]``. Point the
metrics in :mod:`latentfm.metrics.generative` at your own network by wrapping
it, e.g. a pretrained MedicalNet / ResNet-3D in JAX or PyTorch::

  def medicalnet_features(volumes):
    with torch.no_grad():
      x = torch.from_numpy(np.asarray(volumes, np.float32))[:, None]
      return model(x).mean(dim=(2, 3, 4)).cpu().numpy()  # [N, F]

Two extractors work offline and need no weights:

* :func:`random_conv_features` -- a FIXED, seeded, randomly initialised 3D
  conv net (stride-2 convolutions with ReLU, mean and std pooled after every
  layer) plus multi-scale intensity histograms and gradient (texture)
  statistics.
* :func:`intensity_histogram_features` -- the histogram of foreground
  intensities and the foreground fraction.

Caveat. Fréchet distances / KID computed on these features are NOT comparable
with published FID, FVD or "3D-FID" numbers: those use networks pretrained on
ImageNet, Kinetics or medical data, whose features encode learned semantics,
whereas the weights here are random. Random conv features still respond to
intensity, texture and shape statistics (random-feature baselines are known to
rank generative models sensibly), but the absolute values depend on the
extractor, its seed and widths, and the volume resolution. Compare numbers only
within this library, computed with the same extractor, seed and resolution.

:func:`tissue_volumes` is the morphometric counterpart: interpretable
per-volume measures (brain, CSF, GM, WM and ventricle volumes) from an
intensity-based tissue split; see its docstring for the method.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from latentfm.train import compiler

FeatureExtractor = Callable[[np.ndarray], np.ndarray]
"""Maps volumes ``[N, D, H, W]`` in [0, 1] to feature vectors ``[N, F]``."""


def as_volumes(volumes) -> np.ndarray:
  """Volumes in the layout every extractor takes.

  Args:
    volumes: array-like ``[N, D, H, W]`` or ``[N, D, H, W, 1]``, values in [0, 1].
  Returns:
    float32 ``[N, D, H, W]`` (a trailing channel of 1 is dropped); a ValueError for any
    other shape.
  """
  v = np.asarray(volumes, dtype=np.float32)
  if v.ndim == 5 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.ndim != 4:
    raise ValueError(f"Expected volumes [N, D, H, W], got shape {v.shape}.")
  return v


def _init_conv_weights(seed: int, widths: Sequence[int], kernel_size: int) -> list[jax.Array]:
  """He-normal 3D kernels ``[k, k, k, C_in, C_out]``, one per layer."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(widths))
  weights, c_in = [], 1
  for key, c_out in zip(keys, widths):
    fan_in = kernel_size**3 * c_in
    shape = (kernel_size,) * 3 + (c_in, c_out)
    weights.append(jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in))
    c_in = c_out
  return weights


def _avg_pool(x: jax.Array, factor: int) -> jax.Array:
  """Average pooling of ``[N, D, H, W]`` by ``factor`` (trailing voxels cut)."""
  if factor == 1:
    return x
  n, d, h, w = x.shape
  d, h, w = d // factor, h // factor, w // factor
  x = x[:, : d * factor, : h * factor, : w * factor]
  return x.reshape(n, d, factor, h, factor, w, factor).mean(axis=(2, 4, 6))


def _histogram(x: jax.Array, bins: int) -> jax.Array:
  """Per-volume fraction of voxels in each of ``bins`` equal bins of [0, 1]."""
  idx = jnp.clip(jnp.floor(x * bins), 0, bins - 1).astype(jnp.int32)
  idx = idx.reshape(x.shape[0], -1)
  counts = jax.vmap(lambda i: jnp.bincount(i, length=bins))(idx)
  return counts / idx.shape[1]


def _texture_stats(x: jax.Array) -> jax.Array:
  """Mean and std of intensity and of the finite-difference gradient norm."""
  gx = jnp.diff(x, axis=1)[:, :, :-1, :-1]
  gy = jnp.diff(x, axis=2)[:, :-1, :, :-1]
  gz = jnp.diff(x, axis=3)[:, :-1, :-1, :]
  grad = jnp.sqrt(gx * gx + gy * gy + gz * gz)
  axes = (1, 2, 3)
  return jnp.stack([x.mean(axes), x.std(axes), grad.mean(axes), grad.std(axes)], axis=1)


@compiler.jit(static_argnames=("scales", "bins"))
def _random_conv_apply(
  weights: list[jax.Array], x: jax.Array, scales: tuple[int, ...], bins: int
) -> jax.Array:
  """Features of a batch ``[N, D, H, W]``; see :func:`random_conv_features`."""
  feats = []
  h = (2.0 * x - 1.0)[..., None]  # NDHWC, centred intensities
  for w in weights:
    h = lax.conv_general_dilated(
      h, w, window_strides=(2, 2, 2), padding="SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    h = jax.nn.relu(h)
    feats += [h.mean(axis=(1, 2, 3)), h.std(axis=(1, 2, 3))]
  for s in scales:
    xs = _avg_pool(x, s)
    feats += [_histogram(xs, bins), _texture_stats(xs)]
  return jnp.concatenate(feats, axis=1)


def batched(fn: Callable[[jax.Array], jax.Array], batch_size: int) -> FeatureExtractor:
  """Applies ``fn`` in fixed-size batches (the last one is padded).

  Args: fn maps a batch `(batch_size, ...)` to `(batch_size, F)`.
  Returns: a function of `(N, ...)` giving `(N, F)`.
  """

  def extract(volumes) -> np.ndarray:
    v = as_volumes(volumes)
    out = []
    for start in range(0, len(v), batch_size):
      chunk = v[start : start + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(fn(jnp.asarray(chunk)))[: batch_size - pad])
    return np.concatenate(out).astype(np.float64)

  return extract


def random_conv_features(
  seed: int = 0,
  widths: Sequence[int] = (16, 32, 64),
  kernel_size: int = 3,
  scales: Sequence[int] = (1, 2, 4),
  histogram_bins: int = 16,
  batch_size: int = 8,
) -> FeatureExtractor:
  """A fixed random 3D conv net plus intensity/texture statistics.

  The net applies ``len(widths)`` stride-2 ``kernel_size``^3 convolutions
  (He-normal weights drawn from ``seed``, no bias) with ReLU to ``2x - 1``;
  after every layer each channel is pooled by its spatial mean and std. To
  these it appends, at each ``scales`` factor of average pooling, a
  ``histogram_bins`` intensity histogram over [0, 1] (fractions of all voxels,
  so bin 0 also measures the background / brain size) and the mean and std of
  the intensity and of the gradient norm. The feature size is
  ``2 * sum(widths) + len(scales) * (histogram_bins + 4)`` (284 by default).

  Values are only comparable for the same arguments and resolution (see the
  module docstring). Deterministic: the same seed gives the same features
  (independent of ``batch_size`` up to float32 rounding).

  Args:
    seed: seed of the convolution weights.
    widths: output channels of each stride-2 convolution.
    kernel_size: the convolutions' edge length.
    scales: average-pooling factors of the intensity and gradient statistics.
    histogram_bins: bins of each intensity histogram over [0, 1].
    batch_size: volumes per compiled call.
  Returns:
    A :data:`FeatureExtractor`: volumes ``[N, D, H, W]`` in [0, 1] to float64 ``[N, F]``.
  """
  weights = _init_conv_weights(seed, tuple(widths), kernel_size)
  fn = functools.partial(_random_conv_apply, weights, scales=tuple(scales), bins=histogram_bins)
  return batched(fn, batch_size)


def intensity_histogram_features(bins: int = 32, foreground: float = 0.05) -> FeatureExtractor:
  """Histogram of foreground intensities plus the foreground fraction.

  Voxels above ``foreground`` are binned into ``bins`` equal bins of
  ``(foreground, 1]``; the counts are normalised to sum to 1 (a volume with no
  foreground gives zeros). The last feature is the foreground fraction of the
  volume.

  Args:
    bins: histogram bins, >= 1.
    foreground: the intensity in [0, 1) above which a voxel counts as foreground.
  Returns:
    A feature extractor: volumes ``[N, D, H, W]`` in [0, 1] to float64 ``[N, bins + 1]``,
    each row's first ``bins`` values in [0, 1] summing to 1 (0 with no foreground), the last
    the foreground fraction in [0, 1].
  """

  def extract(volumes) -> np.ndarray:
    v = as_volumes(volumes)
    v = v.reshape(v.shape[0], -1)
    fg = v > foreground
    rel = (v - foreground) / (1.0 - foreground)
    idx = np.clip((rel * bins).astype(np.int64), 0, bins - 1)
    idx = idx + bins * np.arange(len(v))[:, None]
    counts = np.bincount(idx[fg], minlength=bins * len(v)).reshape(len(v), bins)
    total = np.maximum(counts.sum(1, keepdims=True), 1)
    return np.concatenate([counts / total, fg.mean(1, keepdims=True)], axis=1)

  return extract


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold: maximises the between-class variance of a histogram.

  The histogram spans ``[min(values), max(values)]``; the threshold is the
  upper edge of the last bin of the lower class (values ``< t`` are class 0).

  Args: values, any shape (flattened). Returns: the threshold, a float within their range.
  """
  values = np.asarray(values, np.float64).ravel()
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return hi
  counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
  p = counts / counts.sum()
  centres = 0.5 * (edges[:-1] + edges[1:])
  w0 = np.cumsum(p)[:-1]
  m0 = np.cumsum(p * centres)[:-1]
  total = float((p * centres).sum())
  with np.errstate(divide="ignore", invalid="ignore"):
    between = (total * w0 - m0) ** 2 / (w0 * (1.0 - w0))
  between = np.where(np.isfinite(between), between, -1.0)
  return float(edges[int(np.argmax(between)) + 1])


def _voxel_volume_ml(voxel_size) -> float | None:
  if voxel_size is None:
    return None
  size = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))
  return float(np.prod(size)) / 1000.0  # mm^3 -> ml


def _segment(
  volume: np.ndarray, brain_threshold: float, ventricle_depth: float
) -> dict[str, float]:
  """Voxel counts for one volume; see :func:`tissue_volumes`."""
  brain = ndi.binary_fill_holes(volume > brain_threshold)
  if brain.sum() < 2:
    return dict(brain=float(brain.sum()), csf=0.0, gm=0.0, wm=0.0, ventricles=0.0)
  csf_cut = otsu_threshold(volume[brain])
  csf = brain & (volume < csf_cut)
  tissue = brain & ~csf
  gm_cut = otsu_threshold(volume[tissue]) if tissue.sum() > 1 else np.inf
  gm = tissue & (volume < gm_cut)
  depth = ndi.distance_transform_edt(brain)
  ventricles = csf & (depth > ventricle_depth * depth.max())
  return dict(
    brain=float(brain.sum()),
    csf=float(csf.sum()),
    gm=float(gm.sum()),
    wm=float((tissue & ~gm).sum()),
    ventricles=float(ventricles.sum()),
  )


def tissue_volumes(
  volumes,
  brain_threshold: float = 0.05,
  voxel_size: float | Sequence[float] | None = None,
  ventricle_depth: float = 0.4,
) -> dict[str, np.ndarray]:
  """Per-volume brain, CSF, GM, WM and ventricle volumes of T1 scans.

  Method (per volume, intensity based, no atlas):

  1. Brain mask: voxels above ``brain_threshold`` (skull-stripped input,
     background 0), internal holes filled.
  2. CSF vs tissue: Otsu's threshold on the brain-voxel intensities; darker
     voxels are CSF. Then GM vs WM: Otsu again on the tissue voxels. This
     two-level split is used instead of a joint 3-class split because the CSF
     class is small and the GM/WM contrast weak at low resolution, where a
     joint 3-class Otsu / k-means tends to cut the tissue peak rather than
     isolate CSF. Otsu is invariant to intensity scaling, so global contrast
     or gain changes do not move the split.
  3. Ventricle proxy: CSF voxels deeper inside the brain than
     ``ventricle_depth`` times the maximum depth (Euclidean distance to the
     mask boundary), i.e. central CSF, excluding sulcal CSF.

  Partial-volume voxels at the brain surface fall into CSF, so the CSF
  fraction has a resolution-dependent floor; compare volumes of equal
  resolution. Atrophy (larger ventricles, wider sulci) raises ``csf_fraction``
  and ``ventricle_fraction``.

  Args:
    volumes: ``[N, D, H, W]`` in [0, 1].
    brain_threshold: foreground intensity threshold.
    voxel_size: voxel size in mm (scalar or per-axis); if given, absolute
      volumes are in ml, otherwise in voxels.
    ventricle_depth: relative depth defining the central region, in (0, 1).

  Returns:
    Dict of float64 arrays ``[N]``: ``brain``, ``csf``, ``gm``, ``wm``,
    ``ventricles`` (ml or voxels), ``csf_fraction`` and ``ventricle_fraction``
    (relative to the brain volume).
  """
  v = as_volumes(volumes)
  rows = [_segment(x, brain_threshold, ventricle_depth) for x in v]
  out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
  brain = np.maximum(out["brain"], 1.0)
  out["csf_fraction"] = out["csf"] / brain
  out["ventricle_fraction"] = out["ventricles"] / brain
  scale = _voxel_volume_ml(voxel_size)
  if scale is not None:
    for k in ("brain", "csf", "gm", "wm", "ventricles"):
      out[k] = out[k] * scale
  return out

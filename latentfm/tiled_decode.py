"""Decoding a large latent in overlapping tiles, so that memory is bounded by the tile.

The latent is cut into a grid of equal tiles that overlap by at least `overlap` latent voxels.
Each tile is decoded on its own and the tiles are blended with weights that sum to one at every
voxel and fall linearly to zero across the middle of each overlap, leaving out the margin next
to a tile's inner edge that its replicate padding reaches (`decoder_margin`). With an overlap of
more than twice that margin every voxel that counts was decoded with all of its true
neighbours, so the seams are blended and the volume is the whole-volume decode.

In a whole-volume decode the decoder's GroupNorms see the whole volume; a tile alone would
normalise with its own statistics and come out brighter or darker than its neighbours. With
`global_norms` (the default) every GroupNorm gets the whole volume's statistics instead. They
are gathered one norm at a time: pass k decodes every tile only up to norm k (XLA drops the
unused rest), with the norms before it already fixed, and sums the blend-weighted first and
second moments there. A decoder with L norms thus costs L partial passes and one full pass
over the tiles and never holds more than one tile's activations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latentfm.nn.group_norm import GroupNorm, group_norm_given_stats
from latentfm.nn.vqgan import from_model_range
from latentfm.train import compiler

Array = jax.Array


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Starts of the fewest tiles of `tile` voxels that cover `size` with neighbours overlapping
  by at least `overlap`, spread evenly (one tile at 0 when `tile >= size`)."""
  if tile >= size:
    return [0]
  if not 0 <= overlap < tile:
    raise ValueError(f"overlap must be in [0, tile), got overlap {overlap} for tile {tile}")
  count = 1 + math.ceil((size - tile) / (tile - overlap))
  return [int(round(s)) for s in np.linspace(0, size - tile, count)]


def decoder_margin(model: Any) -> int:
  """How many latent voxels from a tile's edge the replicate padding can reach into the
  decoded tile (the decoder's receptive radius, rounded up), on the axis it reaches farthest.

  Per upsampling stage: the upsampler reaches one voxel of its input along a doubled axis (two
  along an axis it keeps: a 4-tap kernel at stride 1), each residual block's two convs one voxel
  each of its output; the last conv one voxel of the volume.
  """
  from latentfm.nn.vqgan import stage_strides  # pylint: disable=import-outside-toplevel

  radius, scale = np.zeros(3), np.ones(3)
  for strides in stage_strides(model.downsample):
    strides = np.asarray(strides, float)
    radius += np.where(strides > 1, 1.0, 2.0) / scale
    scale *= strides
    radius += 4 / scale
  return math.ceil(float(np.max(radius + 1 / scale)))


def blend_weights(
  size: int, starts: Sequence[int], tile: int, scale: int, margin: int = 0
) -> np.ndarray:
  """Weights `(len(starts), size * scale)` of tiles `[start, start + tile)` along one axis, at
  `scale` voxels per latent voxel; they sum to 1 at every voxel.

  Where two tiles overlap by o latent voxels, each tile's weight falls linearly to 0 across the
  central o - 2 `margin` voxels of the overlap, so that the `margin` voxels next to a tile's
  inner edge (where its padding shows) get no weight; when o - 2 `margin` < 1 the fall spans
  the whole overlap.
  """
  centres = (np.arange(size * scale) + 0.5) / scale  # voxel centres in latent units
  weights = []
  for i, a in enumerate(starts):
    e = a + tile
    w = np.where((centres >= a) & (centres < e), 1.0, 0.0)
    if i > 0 and starts[i - 1] + tile > a:
      lo, band = _band(starts[i - 1] + tile - a, margin)
      w = np.minimum(w, np.clip((centres - a - lo) / band, 0.0, 1.0))
    if i + 1 < len(starts) and e > starts[i + 1]:
      lo, band = _band(e - starts[i + 1], margin)
      w = np.minimum(w, np.clip((e - lo - centres) / band, 0.0, 1.0))
    weights.append(w)
  weights = np.stack(weights)
  total = weights.sum(axis=0, keepdims=True)
  if not np.all(total > 0):
    raise ValueError(
      f"tiles of {tile} starting at {list(starts)} leave voxels uncovered "
      f"outside the {margin}-voxel margins; use larger tiles"
    )
  return weights / total


def _band(overlap: int, margin: int) -> tuple[float, float]:
  """(distance from the tile edge where the fall starts, its length) for one overlap."""
  if overlap - 2 * margin >= 1:
    return float(margin), float(overlap - 2 * margin)
  return 0.0, float(overlap)


def _interceptor(fixed, capture, weights, captured):
  """Gives the GroupNorms before number `capture` the statistics `fixed` ((B, G) mean and
  variance each); appends the blend-weighted sums of 1, x and x² per (batch, group) (B, G, 3)
  of the input of norm number `capture` to `captured`."""
  count = [0]

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, GroupNorm) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    k, x = count[0], args[0]
    count[0] += 1
    if k == capture:
      xf = x.astype(jnp.float32)
      w = jnp.broadcast_to(weights[tuple(x.shape[1:4])][None, ..., None], x.shape)
      groups = module.num_groups
      grouped = lambda v: v.reshape(x.shape[0], -1, groups, x.shape[-1] // groups).sum((1, 3))
      captured.append(jnp.stack([grouped(w), grouped(w * xf), grouped(w * xf * xf)], -1))
    if k < len(fixed):
      mean, var = fixed[k]
      return group_norm_given_stats(
        x,
        module.get_variable("params", "scale"),
        module.get_variable("params", "bias"),
        mean,
        var,
        module.epsilon,
        module.silu,
        module.dtype,
      )
    return next_fun(*args, **kwargs)

  return intercept


@compiler.jit(static_argnums=(0, 4))
def _pass(model, variables, z, fixed, capture, weights):
  """Decodes tile `z`, its first len(`fixed`) norms with the given statistics; returns the
  weighted moments at norm `capture`, or, with `capture` None, the tile (B, D, H, W) in [0, 1]."""
  captured = []
  with nn.intercept_methods(_interceptor(fixed, capture, weights, captured)):
    y = model.apply(variables, z, method=model.decode)
  return captured[0] if capture is not None else from_model_range(y)[..., 0]


def norm_input_shapes(model: Any, variables: dict, z: Array) -> list[tuple[int, int, int]]:
  """Spatial shapes of the inputs of the decoder's GroupNorm calls, in call order (no compute)."""
  seen = []

  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, GroupNorm) and context.method_name == "__call__":
      seen.append(tuple(args[0].shape[1:4]))
    return next_fun(*args, **kwargs)

  def run(v, z):
    with nn.intercept_methods(intercept):
      return model.apply(v, z, method=model.decode)

  jax.eval_shape(run, variables, z)
  return seen


def decode_tiled(
  model: Any,
  variables: dict,
  z: Array,
  tile: Sequence[int] | int,
  overlap: int | None = None,
  global_norms: bool = True,
) -> np.ndarray:
  """Decodes latents `z` (N, d, h, w, C) tile by tile; memory is that of one tile's decode.

  Args:
    model: the `VQGAN` module (decoded here without `remat`; same parameters).
    variables: its {"params", ...}.
    z: un-normalised latents (N, d, h, w, embedding_dim).
    tile: tile size in latent voxels, one for all axes or one per axis (clipped to the latent).
    overlap: least number of latent voxels neighbouring tiles share; None: 2 `decoder_margin`
      + 2 (exact, with a 2-voxel blend). A smaller overlap blends across all of it.
    global_norms: normalise every tile with the whole volume's GroupNorm statistics; False
      uses each tile's own (one pass, but the tiles' brightness differs).
  Returns:
    float32 numpy volumes (N, D, H, W) in [0, 1].
  """
  model = model.clone(remat=False)
  z = jnp.asarray(z)
  latent = tuple(int(n) for n in z.shape[1:4])
  tile = tuple(min(int(t), n) for t, n in zip(np.broadcast_to(tile, (3,)), latent))
  if min(tile) < 1:
    raise ValueError(f"tile must be positive, got {tile}")
  margin = decoder_margin(model)
  overlap = 2 * margin + 2 if overlap is None else int(overlap)
  if any(t < n and t <= overlap for t, n in zip(tile, latent)):
    raise ValueError(
      f"tiles of {tile} latent voxels must be larger than the overlap "
      f"{overlap} (this decoder's exact overlap is {2 * margin + 2})"
    )
  grid = [tile_starts(n, t, overlap) for n, t in zip(latent, tile)]
  corners = [
    tuple(int(c) for c in corner)
    for corner in np.array(np.meshgrid(*grid, indexing="ij")).reshape(3, -1).T
  ]
  tile_of = lambda corner: z[
    :,
    corner[0] : corner[0] + tile[0],
    corner[1] : corner[1] + tile[1],
    corner[2] : corner[2] + tile[2],
  ]
  shapes = norm_input_shapes(model, variables, tile_of(corners[0]))

  def weights(corner, spatial):  # the blend weights of a tile at a spatial shape of its decode
    scale = [s // t for s, t in zip(spatial, tile)]
    rows = [
      blend_weights(n, g, t, s, margin)[g.index(c), c * s : (c + t) * s]
      for n, g, t, s, c in zip(latent, grid, tile, scale, corner)
    ]
    return np.einsum("i,j,k->ijk", *rows).astype(np.float32)

  fixed = []
  for k in range(len(shapes) if global_norms else 0):
    sums = sum(
      np.asarray(
        _pass(
          model,
          variables,
          tile_of(c),
          tuple(fixed),
          k,
          {shapes[k]: jnp.asarray(weights(c, shapes[k]))},
        ),
        np.float64,
      )
      for c in corners
    )
    mean = sums[..., 1] / sums[..., 0]
    var = np.maximum(sums[..., 2] / sums[..., 0] - mean * mean, 0.0)
    fixed.append((jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)))
  factors = tuple(int(f) for f in model.downsample)
  out = np.zeros((z.shape[0],) + tuple(n * f for n, f in zip(latent, factors)), np.float32)
  for c in corners:
    y = np.asarray(_pass(model, variables, tile_of(c), tuple(fixed), None, {}))
    region = tuple(slice(a * f, (a + t) * f) for a, t, f in zip(c, tile, factors))
    out[(slice(None),) + region] += y * weights(c, y.shape[1:])
  return out

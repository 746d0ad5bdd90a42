"""Stride-1 VALID convolutions for XLA:CPU: 3D as 2D convolutions over depth slabs.

XLA:CPU runs 2D convolutions several times faster than 3D ones and differentiates strided
and 3D convolutions slowly. `conv_padded` computes a stride-1 convolution of 1-3 spatial axes,
VALID over its input zero-padded, with 2D convolutions over (H, W), the depth handled by folding
its taps into channels or by Winograd tiles (`winograd.py`), and a custom VJP whose input and
kernel gradients are 2D convolutions too, except the input gradients of small unpadded
cotangents (matrix products over the taps, `tap_products`). The input gradient leaves out the
padding: a VALID correlation of the cotangent, not a full one cropped afterwards. Reverse mode
only: use `lax_valid`, i.e. the "lax" formulation of `latentfm.nn.layers`, for `jax.jvp`. The
kernel gradients run fastest with XLA's own convolutions rather than YNNPACK's (see
`latentfm.train.compiler`).
"""

from collections.abc import Sequence
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from latentfm.nn.cpu import tap_products, winograd

Array = jax.Array


def dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last input/output and `(*spatial, in, out)` kernel for `nd` spatial axes."""
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, nd + 1) + spatial,
    rhs_spec=(nd + 1, nd) + tuple(range(nd)),
    out_spec=(0, nd + 1) + spatial,
  )


def lax_valid(x: Array, kernel: Array) -> Array:
  """Stride-1 VALID convolution as one `lax.conv_general_dilated` (the reference)."""
  nd = x.ndim - 2
  return lax.conv_general_dilated(
    x, kernel, (1,) * nd, "VALID", dimension_numbers=dimension_numbers(nd)
  )


# Stride-1 3D convs as 2D convs over (H, W) with the depth folded into the batch or the
# contraction: XLA:CPU runs 2D convolutions several times faster than 3D ones. The kernel-gradient
# convs slow down as their contraction grows, so they run in chunks of about _CHUNK_DW pixels per
# depth slice range.
_CHUNK_DW = 16384
# Depth taps as Winograd tiles (`winograd.py`) where they beat the direct form (bench/RESULTS.md,
# "CPU kernel choices", rows "Winograd forward" and "Winograd kernel gradient"): the forward and
# input gradient of kd-tap depth kernels on float32 volumes with at least _WINOGRAD_MIN_SLICES
# output slices and _WINOGRAD_MIN_CHANNELS channels on both sides run as F(m, kd) tiles,
# m = _WINOGRAD_TILE[kd], 2-tap kernels only where the channels do not shrink; the kernel gradient
# runs as F(kd, t) tiles of t = _WINOGRAD_DW_TILE[kd] cotangent slices where both sides also have
# at least _WINOGRAD_DW_MIN_CHANNELS channels. Below these bounds the tiles are level or slower.
_WINOGRAD_TILE = {2: 3, 3: 4, 4: 3}
_WINOGRAD_MIN_SLICES = 6
_WINOGRAD_MIN_CHANNELS = 8
_WINOGRAD_DW_TILE = {3: 4, 4: 3}
_WINOGRAD_DW_MIN_CHANNELS = 64


# Without padding, the input gradient is a full correlation of the cotangent, padded by k - 1 on
# each side (with padding, `_slab_dx` pads it by k - 1 - pad instead, cropping where negative).
# Where that gives at least _TAPS_MIN_FULL_RATIO times as many outputs as the cotangent has
# positions, most of its products meet the zero border, and `tap_products.input_gradient`, which
# skips them, is faster if its tap columns (cotangent positions x taps x input channels) fit in
# _TAPS_MAX_BYTES (row "tap-product input gradient" of bench/RESULTS.md, "CPU kernel choices").
_TAPS_MIN_FULL_RATIO = 1.9
_TAPS_MAX_BYTES = 1 << 28


def _input_gradient_by_taps(g_shape: Sequence[int], w_shape: Sequence[int], itemsize: int) -> bool:
  """Whether `_slab_dx` of a (B, *n, co) cotangent and (*k, ci, co) kernel runs as taps."""
  n, k = g_shape[1:-1], w_shape[:-2]
  ratio = math.prod((m + t - 1) / m for m, t in zip(n, k))
  tap_columns = math.prod(g_shape[:-1]) * math.prod(k) * w_shape[-2] * max(itemsize, 4)
  return ratio >= _TAPS_MIN_FULL_RATIO and tap_columns <= _TAPS_MAX_BYTES


def _winograd_applies(n: int, kd: int, ci: int, co: int, dtype) -> bool:
  """Whether a kd-tap depth kernel over n output slices, ci -> co channels, runs as tiles."""
  return (
    kd in _WINOGRAD_TILE
    and n >= _WINOGRAD_MIN_SLICES
    and dtype == jnp.float32
    and min(ci, co) >= _WINOGRAD_MIN_CHANNELS
    and (kd != 2 or ci <= co)
  )


def _winograd_dw_applies(n: int, kd: int, ci: int, co: int, dtype) -> bool:
  """Whether the kernel gradient of a kd-tap depth kernel over n output slices runs as tiles:
  where the forward pass does, for the kernels and channel counts listed above."""
  return (
    kd in _WINOGRAD_DW_TILE
    and min(ci, co) >= _WINOGRAD_DW_MIN_CHANNELS
    and _winograd_applies(n, kd, ci, co, dtype)
  )


def padded_conv_is_slow(
  kernel_shape: Sequence[int], input_shape: Sequence[int], pads: Sequence[tuple[int, int]]
) -> bool:
  """Whether XLA:CPU runs a convolution with zero padding `pads` ((lo, hi) per spatial axis)
  many times slower than a VALID one on the padded input: where the kernel is longer than the
  unpadded input along a padded axis (bench/RESULTS.md, "CPU kernel choices", row "padded tiny
  inputs").
  Kernels no longer than the input run level either way."""
  return any(k > n and (lo or hi) for k, n, (lo, hi) in zip(kernel_shape, input_shape, pads))


def _conv2d(x: Array, w: Array, pad) -> Array:
  """2D conv, zero padding `pad`. Where the padded conv would be slow, the input is padded
  first, behind a barrier that keeps XLA from folding the pad back into the convolution."""
  if padded_conv_is_slow(w.shape[:2], x.shape[1:3], pad):
    x, pad = lax.optimization_barrier(jnp.pad(x, ((0, 0), *pad, (0, 0)))), "VALID"
  return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _depth_taps_on_input(x: Array, kd: int, n: int) -> Array:
  """(B, n + kd - 1, H, W, C) -> (B * n, H, W, kd * C): the kd depth neighbours as channels."""
  x = jnp.concatenate([x[:, a : a + n] for a in range(kd)], axis=-1)
  return x.reshape(x.shape[0] * n, *x.shape[2:])


def _winograd_correlate(x: Array, w: Array, pad) -> Array:
  """`y[d] = sum_a conv2d(x[d + a], w[a], pad)` for the D - kd + 1 output slices of a kd-tap
  depth kernel, as 2D convs of Winograd depth tiles (the input zero-padded to whole tiles)."""
  r = w.shape[0]
  m, b, n = _WINOGRAD_TILE[r], x.shape[0], x.shape[1] - r + 1
  q = winograd.tiles_needed(n, m)
  tiles = winograd.input_tiles(_pad_depth(x, 0, m * q - n), m, r)
  products = [
    _conv2d(t.reshape(b * q, *t.shape[2:]), v, pad)
    for t, v in zip(tiles, winograd.kernel_points(w, m))
  ]
  return winograd.outputs([p.reshape(b, q, *p.shape[1:]) for p in products], m, r)[:, :n]


def _slab_fwd(x: Array, w: Array) -> Array:
  """2D convs over (H, W), depth by Winograd tiles or folded into the narrower channel side.

  Few input channels, or few output slices of a kernel with more than 2 depth taps: the kd
  depth neighbours become input channels (one 2D conv). Otherwise the taps become output
  channels and a shifted sum adds them up; with under _WINOGRAD_MIN_SLICES output slices that
  computes slices that are not needed, so those take the first form, except 2-tap kernels, where
  both forms run level (row "few depth slices" of bench/RESULTS.md, "CPU kernel choices").
  """
  kd, kh, kw, ci, co = w.shape
  (b, d), n = x.shape[:2], x.shape[1] - kd + 1
  if _winograd_applies(n, kd, ci, co, x.dtype):
    return _winograd_correlate(x, w, ((0, 0), (0, 0)))
  depth_as_input = ci < co or (n < _WINOGRAD_MIN_SLICES and kd > 2)
  if depth_as_input:
    x2, w2 = _depth_taps_on_input(x, kd, n), w.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kd * ci, co)
  else:
    x2, w2 = x.reshape(b * d, *x.shape[2:]), w.transpose(1, 2, 3, 0, 4).reshape(kh, kw, ci, kd * co)
  # A VALID conv, not one padded along W and cropped (slower; row "W padding" of
  # bench/RESULTS.md, "CPU kernel choices").
  z = _conv2d(x2, w2, ((0, 0), (0, 0)))
  if depth_as_input:
    return z.reshape(b, n, *z.shape[1:])
  z = z.reshape(b, d, *z.shape[1:3], kd, co)
  return sum(z[:, a : a + n, :, :, a] for a in range(1, kd)) + z[:, :n, :, :, 0]


def zero_pad(x: Array, pads) -> Array:
  """Zero-pads the spatial axes of a channels-last `x` by `pads` ((lo, hi) per axis); negative
  widths crop."""
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *[(*p, 0) for p in pads], (0, 0, 0)))


def _pad_depth(x: Array, lo: int, hi: int) -> Array:
  """Zero-pads (or crops) the depth axis of a (B, D, H, W, C) array."""
  return zero_pad(x, ((lo, hi), (0, 0), (0, 0)))


def _pad_for_conv(x: Array, kernel_shape: Sequence[int], pads) -> Array:
  """`zero_pad(x, pads)` for a VALID conv with `kernel_shape`, behind a barrier where XLA would
  fold the padding into the convolution and run it slowly (`padded_conv_is_slow`)."""
  padded = zero_pad(x, pads)
  grown = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  slow = padded_conv_is_slow(kernel_shape, x.shape[1:-1], grown)
  return lax.optimization_barrier(padded) if slow else padded


def _slab_dx(w: Array, g: Array, pads=((0, 0),) * 3) -> Array:
  """Input gradient of the input zero-padded by `pads`, without its padding.

  Padded: a VALID correlation of the cotangent, zero-padded by k - 1 - pad (a negative width
  crops), with the flipped kernel, as `_slab_fwd`. This skips the gradient of the padding, which
  a full correlation computes and discards (bench/RESULTS.md, "CPU kernel choices", row "padded
  input gradient").
  Unpadded: a full 2D conv of `g` with the flipped kernel, depth taps as in `_slab_fwd`
  (small cotangents: `tap_products.input_gradient`); input slice d receives tap a from
  cotangent slice d - a.
  """
  if any(lo or hi for lo, hi in pads):
    k = w.shape[:3]
    g = _pad_for_conv(g, k, [(t - 1 - lo, t - 1 - hi) for t, (lo, hi) in zip(k, pads)])
    return _slab_fwd(g, w[::-1, ::-1, ::-1].swapaxes(3, 4))
  if _input_gradient_by_taps(g.shape, w.shape, g.dtype.itemsize):
    return tap_products.input_gradient(g, w)
  kd, kh, kw, ci, co = w.shape
  b, n = g.shape[:2]
  w = w[:, ::-1, ::-1]
  pad = ((kh - 1, kh - 1), (kw - 1, kw - 1))
  if _winograd_applies(n, kd, ci, co, g.dtype):
    return _winograd_correlate(_pad_depth(g, kd - 1, kd - 1), w[::-1].swapaxes(3, 4), pad)
  if co < ci:  # the kd neighbours of each slice as input channels: block kd-1-a is tap a
    g3 = _depth_taps_on_input(_pad_depth(g, kd - 1, kd - 1), kd, n + kd - 1)
    z = _conv2d(g3, w[::-1].transpose(1, 2, 0, 4, 3).reshape(kh, kw, kd * co, ci), pad)
    return z.reshape(b, n + kd - 1, *z.shape[1:])
  # The taps as output channels, each shifted by its depth offset, then summed. With 32 or more
  # slices the cotangent is zero-padded first (lead = kd - 1; the conv grows by at most 1/8), so
  # that every shift is a crop, which XLA fuses into the sum, faster than padding each tap's
  # output into its own full-size array (row "shifted taps" of bench/RESULTS.md, "CPU kernel
  # choices").
  lead = kd - 1 if n >= 16 * (kd - 1) else 0
  w2 = w.transpose(1, 2, 4, 0, 3).reshape(kh, kw, co, kd * ci)
  z = _conv2d(_pad_depth(g, lead, lead).reshape(-1, *g.shape[2:]), w2, pad)
  z = z.reshape(b, n + 2 * lead, *z.shape[1:3], kd, ci)
  return sum(_pad_depth(z[..., a, :], a - lead, kd - 1 - a - lead) for a in range(kd))


def _own_buffer(x: Array) -> Array:
  """`x`, computed into a buffer of its own: the operand of a conditional, which XLA always
  materialises. XLA:CPU transposes a whole buffer with a fast copy but a slice fused into the
  transpose element by element, several times slower, and it fuses such
  slices even across an optimization barrier. Both branches return `x` bit for bit, one of them
  by negating twice: JAX drops a conditional whose branches all return their operand as it is,
  and the slice would be fused again."""
  first = x.reshape(-1)[0]
  return lax.cond(first == first, lambda v: -(-v), lambda v: v, x)  # noqa: B002 (NaN: the other branch)


def _slab_dw(x: Array, g: Array, kd: int) -> Array:
  """Kernel gradient: per chunk of depth slices, one 2D conv over (D*H, W).

  Depth and H are merged into one axis, on which the kd depth taps are the outputs at stride H
  when every cotangent slice is zero-padded to the input's H. The H taps are the kernel's output
  channels: tap i is the cotangent shifted down by i rows inside that padding (a negative conv
  padding instead gave wrong, run-dependent values on XLA:CPU). So one conv per chunk packs the
  input windows once for all H taps, not once per tap (same values, faster: row "H taps as
  outputs" of bench/RESULTS.md, "CPU kernel choices"). Each input chunk is copied into a buffer of
  its own and transposed once, channels first, and no operand is repeated along the channels.
  """
  b, n, h, w, co = g.shape
  hp, wp, ci = x.shape[2:]
  kh, kw = hp - h + 1, wp - w + 1
  step, total = max(1, _CHUNK_DW // (h * w)), 0
  for s in range(0, n, step):
    m = min(step, n - s)
    xs = _own_buffer(x[:, s : s + m + kd - 1].reshape(b, (m + kd - 1) * hp, wp, ci))
    xs = xs.transpose(3, 1, 2, 0)  # (ci, rows, W, b): the channels are the conv's batch
    gs = jnp.stack(
      [
        jnp.pad(g[:, s : s + m], ((0, 0), (0, 0), (i, hp - h - i), (0, 0), (0, 0)))
        for i in range(kh)
      ],
      axis=-2,
    )  # (b, m, hp, w, kh, co)
    total = total + lax.conv_general_dilated(
      xs,
      gs.reshape(b, m * hp, w, kh * co),
      (hp, 1),
      "VALID",
      dimension_numbers=("NHWC", "IHWO", "HWNC"),
    )
  return total.reshape(kd, kw, ci, kh, co).transpose(0, 3, 1, 2, 4)


def _winograd_dw(x: Array, g: Array, kd: int) -> Array:
  """Kernel gradient as `_slab_dw` of Winograd depth tiles: one 2D kernel gradient per point."""
  t, (b, n) = _WINOGRAD_DW_TILE[kd], g.shape[:2]
  q = winograd.tiles_needed(n, t)
  g, x = _pad_depth(g, 0, q * t - n), _pad_depth(x, 0, q * t - n)
  flat = lambda a: a.reshape(b * q, 1, *a.shape[2:])
  products = [
    _slab_dw(flat(u), flat(v), 1)[0] for u, v in zip(*winograd.kernel_gradient_tiles(x, g, kd, t))
  ]
  return winograd.kernel_gradient_outputs(products, kd, t)


def _kernel_gradient(x: Array, g: Array, kd: int) -> Array:
  """Kernel gradient of `_slab_conv`: Winograd tiles where they pay, otherwise direct."""
  if _winograd_dw_applies(g.shape[1], kd, x.shape[-1], g.shape[-1], g.dtype):
    return _winograd_dw(x, g, kd)
  return _slab_dw(x, g, kd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _slab_conv(x: Array, w: Array, pads) -> Array:
  """3D VALID conv of `x` zero-padded by `pads` as 2D slab convs, with the slab VJP below."""
  return _slab_fwd(_pad_for_conv(x, w.shape[:3], pads), w)


def _slab_conv_bwd(pads, res, g):
  # Also for the transposed convs' sub-pixel kernels (8x the outputs): a 3D kernel gradient is
  # slower there too (row "sub-pixel kernel gradient" of bench/RESULTS.md, "CPU kernel choices").
  x, w = res
  dw = _kernel_gradient(zero_pad(x, pads), g, w.shape[0])
  return _slab_dx(w, g, pads).astype(x.dtype), dw.astype(w.dtype)


_slab_conv.defvjp(lambda x, w, pads: (_slab_conv(x, w, pads), (x, w)), _slab_conv_bwd)


def conv_padded(x: Array, kernel: Array, pads: Sequence[tuple[int, int]]) -> Array:
  """`conv_valid(zero_pad(x, pads), kernel)`, `pads` >= 0, with the gradient of `x` alone.

  1-3 spatial axes run as slabs (2D: one slab), one output channel as `tap_products` (faster
  there, slower from two output channels: row "one output channel" of bench/RESULTS.md,
  "CPU kernel choices").
  """
  nd, pads = x.ndim - 2, tuple((int(lo), int(hi)) for lo, hi in pads)
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"conv_padded takes zero padding >= 0, got {pads}")
  if nd > 3 or all(k == 1 for k in kernel.shape[:nd]):
    return lax_valid(zero_pad(x, pads), kernel)
  if kernel.shape[-1] == 1:
    return tap_products.conv_valid(_pad_for_conv(x, kernel.shape[:nd], pads), kernel)
  lift = (1,) * (3 - nd)
  y = _slab_conv(
    x.reshape(x.shape[0], *lift, *x.shape[1:]),
    kernel.reshape(*lift, *kernel.shape),
    ((0, 0),) * len(lift) + pads,
  )
  return y.reshape(y.shape[0], *y.shape[1 + len(lift) :])


def conv_valid(x: Array, kernel: Array) -> Array:
  """Stride-1 VALID conv of the "fast" path: `conv_padded` without padding."""
  return conv_padded(x, kernel, ((0, 0),) * (x.ndim - 2))

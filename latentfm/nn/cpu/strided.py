"""Strided and transposed convolutions as stride-1 ones, for XLA:CPU.

XLA:CPU differentiates strided and transposed convolutions slowly, so a strided convolution runs
as space-to-depth by the stride and a stride-1 convolution, and a transposed convolution as one
stride-1 convolution that yields all output phases at once (a sub-pixel convolution) followed by
depth-to-space. Both stride-1 convolutions are `slab_conv.conv_padded`. Same function as one
`lax.conv_general_dilated` (float32 rounding aside; `tests/test_fast_convs.py`).
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np

from latentfm.nn.cpu.slab_conv import conv_padded, zero_pad

Array = jax.Array


def space_to_depth(x: Array, block: Sequence[int]) -> Array:
  """(B, *s*n, C) -> (B, *n, prod(s) * C); channel index (r_1, ..., r_nd, c), row-major."""
  nd, (b, c) = x.ndim - 2, (x.shape[0], x.shape[-1])
  n = [size // s for size, s in zip(x.shape[1:-1], block)]
  x = x.reshape(b, *[d for pair in zip(n, block) for d in pair], c)
  x = x.transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
  return x.reshape(b, *n, math.prod(block) * c)


def depth_to_space(x: Array, block: Sequence[int]) -> Array:
  """Inverse of `space_to_depth`: (B, *n, prod(s) * C) -> (B, *s*n, C)."""
  nd, b, n = x.ndim - 2, x.shape[0], x.shape[1:-1]
  x = x.reshape(b, *n, *block, x.shape[-1] // math.prod(block))
  x = x.transpose(0, *[a for i in range(nd) for a in (1 + i, 1 + nd + i)], 2 * nd + 1)
  return x.reshape(b, *[m * s for m, s in zip(n, block)], x.shape[-1])


def strided_conv(
  x: Array, kernel: Array, strides: Sequence[int], padding: Sequence[tuple[int, int]]
) -> Array:
  """`layers.conv` as zero padding, space-to-depth by the stride and a stride-1 VALID conv.

  Output m reads padded inputs s*m + t, t < k. With the kernel zero-padded to kb*s taps
  (kb = ceil(k/s)) and t = s*j + r, that is block m + j, phase r. Inputs past the last block a
  tap reaches are cropped; missing ones are zeros, which only meet zero taps. Blocks of padding
  alone go to `conv_padded`, which skips their gradient.
  """
  nd, ks = x.ndim - 2, kernel.shape[: x.ndim - 2]
  kb = [-(-k // s) for k, s in zip(ks, strides)]
  pads = [
    (lo, ((n + lo + hi - k) // s + b) * s - n - lo)
    for n, k, s, b, (lo, hi) in zip(x.shape[1:-1], ks, strides, kb, padding)
  ]
  zero_blocks = tuple((lo // s, max(hi, 0) // s) for (lo, hi), s in zip(pads, strides))
  x = zero_pad(
    x, [(lo - s * zl, hi - s * zh) for (lo, hi), s, (zl, zh) in zip(pads, strides, zero_blocks)]
  )
  if all(s == 1 for s in strides):
    return conv_padded(x, kernel, zero_blocks)
  kernel = jnp.pad(kernel, [(0, b * s - k) for k, s, b in zip(ks, strides, kb)] + [(0, 0)] * 2)
  cin, cout = kernel.shape[-2:]
  kernel = kernel.reshape(*[d for pair in zip(kb, strides) for d in pair], cin, cout)
  kernel = kernel.transpose(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2), 2 * nd, 2 * nd + 1)
  return conv_padded(
    space_to_depth(x, strides), kernel.reshape(*kb, math.prod(strides) * cin, cout), zero_blocks
  )


def subpixel_plan(k: int, s: int, c: int) -> tuple[int, int, np.ndarray]:
  """Offsets e, d_lo and tap table of a sub-pixel transposed conv along one axis.

  Transposed-conv output o = s*p + t - c (input p, tap t). Writing o = s*q + r - e, output
  phase r at q reads inputs q + d through tap t = r - e + c - s*d. Picks the e in [0, s) that
  needs the fewest offsets d; `taps[j, r]` is t for d = d_lo + j, or -1 where no tap exists.
  """
  plans = []
  for e in range(s):
    ts = [r - e + c for r in range(s)]
    d_lo = min(-((k - 1 - t) // s) for t in ts)  # ceil((t - k + 1) / s)
    taps = np.array(
      [
        [t - s * d if 0 <= t - s * d < k else -1 for t in ts]
        for d in range(d_lo, max(t // s for t in ts) + 1)
      ]
    )
    plans.append((len(taps), e, d_lo, taps))
  return min(plans, key=lambda p: p[:2])[1:]


def conv_transpose(x: Array, kernel: Array, strides: Sequence[int], crop: Sequence[int]) -> Array:
  """`layers.conv_transpose` as one stride-1 conv giving all output phases, then depth-to-space."""
  nd, ks = x.ndim - 2, kernel.shape[: x.ndim - 2]
  pads, crops = [], []
  for axis, (size, k, s, c) in enumerate(zip(x.shape[1:-1], ks, strides, crop)):
    e, d_lo, taps = subpixel_plan(k, s, c)
    out = (size - 1) * s + k - 2 * c
    pads.append((-d_lo, -(-(out + e) // s) - 1 + d_lo + len(taps) - size))
    crops.append(slice(e, e + out))
    # Phase kernels along this axis: (k,) -> (T, s); index k picks an appended zero tap.
    kernel = jnp.pad(kernel, [(0, int(a == 2 * axis)) for a in range(kernel.ndim)])
    kernel = jnp.take(kernel, jnp.asarray(np.where(taps < 0, k, taps)), axis=2 * axis)
  # (T_1, s_1, ..., T_nd, s_nd, in, out) -> (T_1, ..., T_nd, in, s_1 * ... * s_nd * out).
  cin, cout = kernel.shape[-2:]
  kernel = kernel.transpose(*range(0, 2 * nd, 2), 2 * nd, *range(1, 2 * nd, 2), 2 * nd + 1)
  kernel = kernel.reshape(*kernel.shape[:nd], cin, math.prod(strides) * cout)
  grown = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  x = zero_pad(x, [(min(lo, 0), min(hi, 0)) for lo, hi in pads])  # the crops
  y = depth_to_space(conv_padded(x, kernel, grown), strides)
  return y[(slice(None), *crops, slice(None))]

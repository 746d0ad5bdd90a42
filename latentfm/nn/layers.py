"""Convolution building blocks shared by the VQ-GAN and the discriminators.

All layers are channels-last and work for any number of spatial axes (2D slices and 3D
volumes). Every convolution keeps its weights as one `kernel` of shape
`(*kernel_size, in_features, out_features)` plus a `bias`, whatever formulation computes it, so
that the arithmetic in `conv` / `conv_transpose` can change without changing checkpoints.

Two formulations give the same numbers (`set_conv_impl`): "lax", one `lax.conv_general_dilated`
per layer (the default on accelerators; the reference), and "fast" (the default on the CPU) for
XLA:CPU, which differentiates
strided, transposed and 3D convs slowly: strided convs run as space-to-depth + a stride-1 conv,
transposed convs as sub-pixel convs, stride-1 convs as 2D convs over depth slabs with a custom
VJP (`slab_conv.py`; reverse mode only: use "lax" for `jax.jvp`). Replicate padding has a
memory-light gradient (`edge_pad.py`).

Initialisation follows PyTorch's defaults for `ConvNd` / `ConvTransposeNd` (uniform with bound
1/sqrt(fan_in)), as in the reference implementation.
"""

from collections.abc import Iterator, Sequence
import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from latentfm.nn import group_norm
from latentfm.nn.edge_pad import edge_pad as fast_edge_pad
from latentfm.nn.slab_conv import conv_padded, dimension_numbers, zero_pad

Array = jax.Array
IntOrSeq = int | Sequence[int]
_IMPLS = ("fast", "lax")
_impl: str | None = None  # None: "fast" on the CPU, "lax" on accelerators


def _tuple(v: IntOrSeq, n: int) -> tuple[int, ...]:
  return tuple(v) if isinstance(v, Sequence) else (v,) * n


def torch_kernel_init(transpose: bool = False) -> nn.initializers.Initializer:
  """PyTorch's default conv weight init, U(-b, b) with b = 1/sqrt(fan_in).

  PyTorch computes fan_in of a transposed conv from its output channels, hence `transpose`.
  The numbers are drawn flat and reshaped: XLA:CPU compiles high-rank random draws slowly.
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-2]) * shape[-1 if transpose else -2]
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

  return init


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _to_dtype(x: Array, dtype: Any) -> Array:
  """`x` in the computation dtype `dtype`, or as it is when `dtype` is None."""
  return x if dtype is None else x.astype(dtype)


def _check(impl: str | None) -> str:
  impl = get_conv_impl() if impl is None else impl
  if impl not in _IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {_IMPLS}")
  return impl


def set_conv_impl(impl: str | None) -> None:
  """Selects "fast" or "lax" convolutions, or None for the backend's default; read when
  tracing, so re-jit after."""
  global _impl
  _impl = None if impl is None else _check(impl)


def get_conv_impl() -> str:
  """The formulation in use: the one set by `set_conv_impl`, else the default backend's."""
  if _impl is not None:
    return _impl
  return "fast" if jax.default_backend() == "cpu" else "lax"


@contextlib.contextmanager
def conv_impl(impl: str) -> Iterator[None]:
  """Selects `impl` (see `set_conv_impl`) inside a `with` block."""
  previous = _impl
  set_conv_impl(impl)
  try:
    yield
  finally:
    set_conv_impl(previous)


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


def _strided_conv_fast(x: Array, kernel: Array, strides: Sequence[int],
                       padding: Sequence[tuple[int, int]]) -> Array:
  """`conv` as zero padding, space-to-depth by the stride and a stride-1 VALID conv.

  Output m reads padded inputs s*m + t, t < k. With the kernel zero-padded to kb*s taps
  (kb = ceil(k/s)) and t = s*j + r, that is block m + j, phase r. Inputs past the last block a
  tap reaches are cropped; missing ones are zeros, which only meet zero taps. Blocks of padding
  alone go to `conv_padded`, which skips their gradient.
  """
  nd, ks = x.ndim - 2, kernel.shape[:x.ndim - 2]
  kb = [-(-k // s) for k, s in zip(ks, strides)]
  pads = [(lo, ((n + lo + hi - k) // s + b) * s - n - lo)
          for n, k, s, b, (lo, hi) in zip(x.shape[1:-1], ks, strides, kb, padding)]
  zero_blocks = tuple((lo // s, max(hi, 0) // s) for (lo, hi), s in zip(pads, strides))
  x = zero_pad(x, [(lo - s * zl, hi - s * zh)
                    for (lo, hi), s, (zl, zh) in zip(pads, strides, zero_blocks)])
  if all(s == 1 for s in strides):
    return conv_padded(x, kernel, zero_blocks)
  kernel = jnp.pad(kernel, [(0, b * s - k) for k, s, b in zip(ks, strides, kb)] + [(0, 0)] * 2)
  cin, cout = kernel.shape[-2:]
  kernel = kernel.reshape(*[d for pair in zip(kb, strides) for d in pair], cin, cout)
  kernel = kernel.transpose(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2), 2 * nd, 2 * nd + 1)
  return conv_padded(space_to_depth(x, strides),
                     kernel.reshape(*kb, math.prod(strides) * cin, cout), zero_blocks)


def _subpixel_plan(k: int, s: int, c: int) -> tuple[int, int, np.ndarray]:
  """Offsets e, d_lo and tap table of a sub-pixel transposed conv along one axis.

  Transposed-conv output o = s*p + t - c (input p, tap t). Writing o = s*q + r - e, output
  phase r at q reads inputs q + d through tap t = r - e + c - s*d. Picks the e in [0, s) that
  needs the fewest offsets d; `taps[j, r]` is t for d = d_lo + j, or -1 where no tap exists.
  """
  plans = []
  for e in range(s):
    ts = [r - e + c for r in range(s)]
    d_lo = min(-((k - 1 - t) // s) for t in ts)  # ceil((t - k + 1) / s)
    taps = np.array([[t - s * d if 0 <= t - s * d < k else -1 for t in ts]
                     for d in range(d_lo, max(t // s for t in ts) + 1)])
    plans.append((len(taps), e, d_lo, taps))
  return min(plans, key=lambda p: p[:2])[1:]


def _conv_transpose_fast(x: Array, kernel: Array, strides: Sequence[int],
                         crop: Sequence[int]) -> Array:
  """`conv_transpose` as one stride-1 conv yielding all output phases, then depth-to-space."""
  nd, ks = x.ndim - 2, kernel.shape[:x.ndim - 2]
  pads, crops = [], []
  for axis, (size, k, s, c) in enumerate(zip(x.shape[1:-1], ks, strides, crop)):
    e, d_lo, taps = _subpixel_plan(k, s, c)
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


def conv(x: Array, kernel: Array, strides: Sequence[int],
         padding: Sequence[tuple[int, int]], impl: str | None = None) -> Array:
  """Cross-correlation of channels-last `x` with a `(*k, in, out)` kernel, zero padding."""
  kernel = kernel.astype(x.dtype)
  if _check(impl) == "fast":
    return _strided_conv_fast(x, kernel, tuple(strides), tuple(padding))
  return lax.conv_general_dilated(x, kernel, window_strides=tuple(strides),
                                  padding=tuple(padding),
                                  dimension_numbers=dimension_numbers(x.ndim - 2))


def conv_transpose(x: Array, kernel: Array, strides: Sequence[int],
                   crop: Sequence[int], impl: str | None = None) -> Array:
  """PyTorch-style transposed convolution (`ConvTransposeNd` with `padding=crop`).

  `kernel[t, i, o]` scatters input channel i at position p to output position
  `s * p + t - crop` (channel o): the adjoint of `conv` (same strides, padding `crop`) whose kernel
  has the in/out axes swapped. "lax" correlates the stride-dilated input with the flipped
  kernel; "fast" is a sub-pixel convolution.
  """
  nd, kernel = x.ndim - 2, kernel.astype(x.dtype)
  if _check(impl) == "fast":
    return _conv_transpose_fast(x, kernel, tuple(strides), tuple(crop))
  pad = tuple((k - 1 - c, k - 1 - c) for k, c in zip(kernel.shape[:nd], crop))
  return lax.conv_general_dilated(
      x, kernel[(slice(None, None, -1),) * nd], window_strides=(1,) * nd, padding=pad,
      lhs_dilation=tuple(strides), dimension_numbers=dimension_numbers(nd))


def same_pad_widths(kernel_size: Sequence[int],
                    strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Total padding k - s per axis, split ceil on the left and floor on the right."""
  return tuple(((k - s + 1) // 2, (k - s) // 2) for k, s in zip(kernel_size, strides))


def edge_pad(x: Array, widths: Sequence[tuple[int, int]], impl: str | None = None) -> Array:
  """Replicate-pads the spatial axes of a channels-last array."""
  if _check(impl) == "fast":
    return fast_edge_pad(x, widths)
  return jnp.pad(x, ((0, 0), *widths, (0, 0)), mode="edge")


class SamePadConv(nn.Module):
  """Replicate-padded ("same") convolution: output size = input / stride (divisible sizes)."""
  features: int
  kernel_size: IntOrSeq = 3
  strides: IntOrSeq = 1
  dtype: Any = None  # computation dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    fan_in = x.shape[-1] * math.prod(ks)
    kernel = self.param("kernel", torch_kernel_init(), (*ks, x.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    x = _to_dtype(x, self.dtype)
    y = conv(edge_pad(x, same_pad_widths(ks, st)), kernel, st, ((0, 0),) * nd)
    return y + bias.astype(y.dtype)


class SamePadConvTranspose(nn.Module):
  """Replicate-padded transposed convolution; output size = stride * input size (k4 s2).

  Matches the reference layer: replicate-pad the input by k - s (ceil left, floor right), then a
  PyTorch `ConvTransposeNd(kernel_size=k, stride=s, padding=k - 1)`.
  """
  features: int
  kernel_size: IntOrSeq = 4
  strides: IntOrSeq = 2
  dtype: Any = None  # computation dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    fan_in = self.features * math.prod(ks)  # PyTorch's convention for transposed convs
    kernel = self.param("kernel", torch_kernel_init(transpose=True),
                        (*ks, x.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    x = _to_dtype(x, self.dtype)
    y = conv_transpose(edge_pad(x, same_pad_widths(ks, st)), kernel, st,
                       tuple(k - 1 for k in ks))
    return y + bias.astype(y.dtype)


class ZeroPadConv(nn.Module):
  """Convolution with explicit symmetric zero padding (PyTorch `ConvNd(padding=p)`).

  Initialised like PyTorch unless `kernel_init` / `bias_init` are given; `dtype` is the
  computation dtype (parameters stay float32).
  """
  features: int
  kernel_size: IntOrSeq = 4
  strides: IntOrSeq = 1
  padding: IntOrSeq = 2
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    pads = tuple((p, p) for p in _tuple(self.padding, nd))
    fan_in = x.shape[-1] * math.prod(ks)
    kernel = self.param("kernel", self.kernel_init or torch_kernel_init(),
                        (*ks, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init or torch_bias_init(fan_in), (self.features,))
    y = conv(_to_dtype(x, self.dtype), kernel, st, pads)
    return y + bias.astype(y.dtype)


def GroupNorm(channels: int, max_groups: int = 32, name: str | None = None,
              dtype: Any = None, silu: bool = False,
              recompute: bool = False) -> group_norm.GroupNorm:
  """GroupNorm with min(max_groups, channels) groups and epsilon 1e-6 (reference `Normalize`),
  followed by SiLU if `silu`; `recompute`: see `group_norm.GroupNorm`."""
  return group_norm.GroupNorm(min(max_groups, channels), 1e-6, silu, dtype, recompute, name=name)


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus identity (channels preserved)."""
  norm_groups: int = 32
  dtype: Any = None  # computation dtype; parameters stay float32
  recompute_norms: bool = False  # GroupNorm + SiLU keep only their input for the backward pass

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, light = x.shape[-1], self.recompute_norms
    h = GroupNorm(c, self.norm_groups, "norm1", self.dtype, silu=True, recompute=light)(x)
    h = SamePadConv(c, 3, 1, self.dtype, name="conv1")(h)
    h = GroupNorm(c, self.norm_groups, "norm2", self.dtype, silu=True, recompute=light)(h)
    h = SamePadConv(c, 3, 1, self.dtype, name="conv2")(h)
    return x.astype(h.dtype) + h

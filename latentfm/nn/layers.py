"""Convolution building blocks shared by the VQ-GAN, the flow UNet and the discriminators.

All layers are channels-last and work for any number of spatial axes (2D slices and 3D
volumes). Every convolution keeps its weights as one `kernel` of shape
`(*kernel_size, in_features, out_features)` plus a `bias`, whatever formulation computes it, so
that the arithmetic in `conv` / `conv_transpose` can change without changing checkpoints.

Two implementations give the same numbers, chosen per module by its `conv_impl` field (see
`latentfm.nn.conv_impl`, re-exported here): "lax", one `lax.conv_general_dilated` per layer (the
reference; forward and reverse mode), and "fast", the XLA:CPU formulations of `latentfm.nn.cpu`
(XLA:CPU differentiates strided, transposed and 3D convolutions slowly; reverse mode only).

Initialisation follows PyTorch's defaults for `ConvNd` / `ConvTransposeNd` (uniform with bound
1/sqrt(fan_in)), as in the reference implementation.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from latentfm.nn import group_norm
from latentfm.nn.conv_impl import CONV_IMPLS, resolve_conv_impl, use_conv_impl  # noqa: F401
from latentfm.nn.cpu import edge_pad as cpu_edge_pad
from latentfm.nn.cpu import strided
from latentfm.nn.cpu.slab_conv import dimension_numbers

Array = jax.Array
IntOrSeq = int | Sequence[int]


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


def conv(
  x: Array,
  kernel: Array,
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  impl: str = "auto",
) -> Array:
  """Cross-correlation of channels-last `x` with a `(*k, in, out)` kernel, zero padding.

  Args:
    x: (B, *spatial, in) input.
    kernel: (*k, in, out) weights, cast to `x.dtype`.
    strides: the stride per spatial axis.
    padding: (lo, hi) zeros per spatial axis.
    impl: one of `CONV_IMPLS` (see `resolve_conv_impl`).
  Returns:
    (B, *out_spatial, out), out_spatial = (n + lo + hi - k) // s + 1.
  """
  kernel = kernel.astype(x.dtype)
  if resolve_conv_impl(impl) == "fast":
    return strided.strided_conv(x, kernel, tuple(strides), tuple(padding))
  return lax.conv_general_dilated(
    x,
    kernel,
    window_strides=tuple(strides),
    padding=tuple(padding),
    dimension_numbers=dimension_numbers(x.ndim - 2),
  )


def conv_transpose(
  x: Array, kernel: Array, strides: Sequence[int], crop: Sequence[int], impl: str = "auto"
) -> Array:
  """PyTorch-style transposed convolution (`ConvTransposeNd` with `padding=crop`).

  `kernel[t, i, o]` scatters input channel i at position p to output position
  `s * p + t - crop` (channel o): the adjoint of `conv` (same strides, padding `crop`) whose kernel
  has the in/out axes swapped. "lax" correlates the stride-dilated input with the flipped
  kernel; "fast" is a sub-pixel convolution.
  """
  nd, kernel = x.ndim - 2, kernel.astype(x.dtype)
  if resolve_conv_impl(impl) == "fast":
    return strided.conv_transpose(x, kernel, tuple(strides), tuple(crop))
  pad = tuple((k - 1 - c, k - 1 - c) for k, c in zip(kernel.shape[:nd], crop))
  return lax.conv_general_dilated(
    x,
    kernel[(slice(None, None, -1),) * nd],
    window_strides=(1,) * nd,
    padding=pad,
    lhs_dilation=tuple(strides),
    dimension_numbers=dimension_numbers(nd),
  )


def same_pad_widths(
  kernel_size: Sequence[int], strides: Sequence[int]
) -> tuple[tuple[int, int], ...]:
  """Total padding k - s per axis, split ceil on the left and floor on the right."""
  return tuple(((k - s + 1) // 2, (k - s) // 2) for k, s in zip(kernel_size, strides))


def edge_pad(x: Array, widths: Sequence[tuple[int, int]], impl: str = "auto") -> Array:
  """Replicate-pads the spatial axes of a channels-last array by `widths` ((lo, hi) per axis)."""
  if resolve_conv_impl(impl) == "fast":
    return cpu_edge_pad.edge_pad(x, widths)
  return jnp.pad(x, ((0, 0), *widths, (0, 0)), mode="edge")


class SamePadConv(nn.Module):
  """Replicate-padded ("same") convolution: output size = input / stride (divisible sizes)."""

  features: int
  kernel_size: IntOrSeq = 3
  strides: IntOrSeq = 1
  dtype: Any = None  # computation dtype; parameters stay float32
  conv_impl: str = "auto"  # one of CONV_IMPLS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    fan_in = x.shape[-1] * math.prod(ks)
    kernel = self.param("kernel", torch_kernel_init(), (*ks, x.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    x = _to_dtype(x, self.dtype)
    impl = self.conv_impl
    y = conv(edge_pad(x, same_pad_widths(ks, st), impl), kernel, st, ((0, 0),) * nd, impl)
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
  conv_impl: str = "auto"  # one of CONV_IMPLS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    fan_in = self.features * math.prod(ks)  # PyTorch's convention for transposed convs
    kernel = self.param(
      "kernel", torch_kernel_init(transpose=True), (*ks, x.shape[-1], self.features)
    )
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    x = _to_dtype(x, self.dtype)
    impl = self.conv_impl
    y = conv_transpose(
      edge_pad(x, same_pad_widths(ks, st), impl), kernel, st, tuple(k - 1 for k in ks), impl
    )
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
  conv_impl: str = "auto"  # one of CONV_IMPLS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    pads = tuple((p, p) for p in _tuple(self.padding, nd))
    fan_in = x.shape[-1] * math.prod(ks)
    kernel = self.param(
      "kernel", self.kernel_init or torch_kernel_init(), (*ks, x.shape[-1], self.features)
    )
    bias = self.param("bias", self.bias_init or torch_bias_init(fan_in), (self.features,))
    y = conv(_to_dtype(x, self.dtype), kernel, st, pads, self.conv_impl)
    return y + bias.astype(y.dtype)


def GroupNorm(
  channels: int,
  max_groups: int = 32,
  name: str | None = None,
  dtype: Any = None,
  silu: bool = False,
  recompute: bool = False,
) -> group_norm.GroupNorm:
  """GroupNorm with min(max_groups, channels) groups and epsilon 1e-6 (reference `Normalize`),
  followed by SiLU if `silu`; `recompute`: see `group_norm.GroupNorm`."""
  return group_norm.GroupNorm(min(max_groups, channels), 1e-6, silu, dtype, recompute, name=name)


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus identity (channels preserved)."""

  norm_groups: int = 32
  dtype: Any = None  # computation dtype; parameters stay float32
  recompute_norms: bool = False  # GroupNorm + SiLU keep only their input for the backward pass
  conv_impl: str = "auto"  # one of CONV_IMPLS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, light, impl = x.shape[-1], self.recompute_norms, self.conv_impl
    h = GroupNorm(c, self.norm_groups, "norm1", self.dtype, silu=True, recompute=light)(x)
    h = SamePadConv(c, 3, 1, self.dtype, impl, name="conv1")(h)
    h = GroupNorm(c, self.norm_groups, "norm2", self.dtype, silu=True, recompute=light)(h)
    h = SamePadConv(c, 3, 1, self.dtype, impl, name="conv2")(h)
    return x.astype(h.dtype) + h

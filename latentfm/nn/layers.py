"""Convolution building blocks shared by the VQ-GAN and the discriminators.

All layers are channels-last and work for any number of spatial axes (2D slices and 3D
volumes). Every convolution keeps its weights as one `kernel` of shape
`(*kernel_size, in_features, out_features)` plus a `bias`, whatever formulation computes it, so
that the arithmetic in `conv` / `conv_transpose` can change without changing checkpoints.

Initialisation follows PyTorch's defaults for `ConvNd` / `ConvTransposeNd` (uniform with bound
1/sqrt(fan_in)), as in the reference implementation.
"""

from collections.abc import Sequence
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
IntOrSeq = int | Sequence[int]


def _tuple(v: IntOrSeq, n: int) -> tuple[int, ...]:
  return tuple(v) if isinstance(v, Sequence) else (v,) * n


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last input/output and `(*spatial, in, out)` kernel for `nd` spatial axes."""
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, nd + 1) + spatial, rhs_spec=(nd + 1, nd) + tuple(range(nd)),
      out_spec=(0, nd + 1) + spatial)


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


def conv(x: Array, kernel: Array, strides: Sequence[int],
         padding: Sequence[tuple[int, int]]) -> Array:
  """Cross-correlation of channels-last `x` with a `(*k, in, out)` kernel, zero padding."""
  nd = x.ndim - 2
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=tuple(strides), padding=tuple(padding),
      dimension_numbers=_dimension_numbers(nd))


def conv_transpose(x: Array, kernel: Array, strides: Sequence[int],
                   crop: Sequence[int]) -> Array:
  """PyTorch-style transposed convolution (`ConvTransposeNd` with `padding=crop`).

  `kernel[t, i, o]` scatters input channel i at position p to output position
  `s * p + t - crop` (channel o): the adjoint of `conv` (same strides, padding `crop`) whose kernel
  has the in/out axes swapped. Computed as a correlation of the stride-dilated input with the
  spatially flipped kernel.
  """
  nd = x.ndim - 2
  ks = kernel.shape[:nd]
  pad = tuple((k - 1 - c, k - 1 - c) for k, c in zip(ks, crop))
  flipped = kernel[(slice(None, None, -1),) * nd]
  return lax.conv_general_dilated(
      x, flipped.astype(x.dtype), window_strides=(1,) * nd, padding=pad,
      lhs_dilation=tuple(strides), dimension_numbers=_dimension_numbers(nd))


def same_pad_widths(kernel_size: Sequence[int],
                    strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Total padding k - s per axis, split ceil on the left and floor on the right."""
  return tuple(((k - s + 1) // 2, (k - s) // 2) for k, s in zip(kernel_size, strides))


def edge_pad(x: Array, widths: Sequence[tuple[int, int]]) -> Array:
  """Replicate-pads the spatial axes of a channels-last array."""
  return jnp.pad(x, ((0, 0), *widths, (0, 0)), mode="edge")


class SamePadConv(nn.Module):
  """Replicate-padded ("same") convolution: output size = input / stride (divisible sizes)."""
  features: int
  kernel_size: IntOrSeq = 3
  strides: IntOrSeq = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    fan_in = x.shape[-1] * math.prod(ks)
    kernel = self.param("kernel", torch_kernel_init(), (*ks, x.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
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

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    fan_in = self.features * math.prod(ks)  # PyTorch's convention for transposed convs
    kernel = self.param("kernel", torch_kernel_init(transpose=True),
                        (*ks, x.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    y = conv_transpose(edge_pad(x, same_pad_widths(ks, st)), kernel, st,
                       tuple(k - 1 for k in ks))
    return y + bias.astype(y.dtype)


class ZeroPadConv(nn.Module):
  """Convolution with explicit symmetric zero padding (PyTorch `ConvNd(padding=p)`)."""
  features: int
  kernel_size: IntOrSeq = 4
  strides: IntOrSeq = 1
  padding: IntOrSeq = 2

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nd = x.ndim - 2
    ks, st = _tuple(self.kernel_size, nd), _tuple(self.strides, nd)
    pads = tuple((p, p) for p in _tuple(self.padding, nd))
    fan_in = x.shape[-1] * math.prod(ks)
    kernel = self.param("kernel", torch_kernel_init(), (*ks, x.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    y = conv(x, kernel, st, pads)
    return y + bias.astype(y.dtype)


def GroupNorm(channels: int, max_groups: int = 32, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with min(max_groups, channels) groups and epsilon 1e-6 (reference `Normalize`)."""
  return nn.GroupNorm(num_groups=min(max_groups, channels), epsilon=1e-6, name=name)


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus identity (channels preserved)."""
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = nn.silu(GroupNorm(c, self.norm_groups, name="norm1")(x))
    h = SamePadConv(c, 3, 1, name="conv1")(h)
    h = nn.silu(GroupNorm(c, self.norm_groups, name="norm2")(h))
    h = SamePadConv(c, 3, 1, name="conv2")(h)
    return x + h

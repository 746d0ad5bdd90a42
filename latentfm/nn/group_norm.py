"""GroupNorm fused with the SiLU after it, optionally with a gradient that keeps only its input.

The same function as `flax.linen.GroupNorm` (statistics in float32 at least, variance as
E[x^2] - E[x]^2 clipped at zero, then `(x - mean) * (rsqrt(var + eps) * scale) + bias`) with the
same parameters (`scale`, `bias`), so checkpoints are interchangeable. Differentiated by XLA, a
GroupNorm + SiLU keeps the centred input and the SiLU's sigmoid for the backward pass: two more
activation-sized buffers per norm. The custom VJP of `group_norm` (`GroupNorm(recompute=True)`,
the models' `recompute_norms`) keeps only the input and the per-group statistics and recomputes
the rest inside the backward pass, which needs just two per-channel sums (they give the
parameter gradients and the input gradient's group means at once): less temporary memory for
a little more time (bench/RESULTS.md, "CPU kernel choices", row "recompute_norms"). Reverse mode
only (`jax.jvp` raises), like the "fast"
convolutions.
"""

from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


def _stats(x: Array, groups: int) -> tuple[Array, Array]:
  """Per (batch, group) mean and variance of `x` (B, ..., C), in float32 or wider."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  xg = xf.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
  mean, mean2 = xg.mean(axis=(1, 3)), jnp.square(xg).mean(axis=(1, 3))
  return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def _per_channel(v: Array, channels: int, ndim: int) -> Array:
  """(B, G) group values -> (B, 1, ..., 1, C), broadcastable against the activation."""
  v = jnp.repeat(v, channels // v.shape[1], axis=1)
  return v.reshape(v.shape[0], *(1,) * (ndim - 2), channels)


def _normalize(x: Array, mean: Array, rstd: Array, scale: Array, bias: Array) -> Array:
  """flax's order of operations: (x - mean) * (rstd * scale) + bias."""
  return (x - mean) * (rstd * scale) + bias


def group_norm(
  x: Array,
  scale: Array,
  bias: Array,
  groups: int,
  epsilon: float,
  silu: bool = False,
  dtype: Any = None,
  recompute: bool = False,
) -> Array:
  """GroupNorm of channels-last `x` (B, ..., C) with `groups` groups, then SiLU if `silu`.

  The result has `dtype`, or by default the promotion of `x`'s and the parameters' dtypes.
  `recompute` differentiates it by the custom VJP below; otherwise XLA differentiates it.
  """
  fn = _recomputing if recompute else _value
  return fn(x, scale, bias, groups, epsilon, silu, dtype)


def _value(x, scale, bias, groups, epsilon, silu, dtype):
  return _forward(x, scale, bias, groups, epsilon, silu, dtype)[0]


def _forward(x, scale, bias, groups, epsilon, silu, dtype):
  mean, var = _stats(x, groups)
  rstd = lax.rsqrt(var + epsilon)
  return _apply(x, scale, bias, mean, rstd, silu, dtype), (x, scale, bias, mean, rstd)


def _apply(x, scale, bias, mean, rstd, silu, dtype):
  c, nd = x.shape[-1], x.ndim
  y = _normalize(x, _per_channel(mean, c, nd), _per_channel(rstd, c, nd), scale, bias)
  y = y.astype(dtype or jnp.result_type(x, scale, bias))
  return nn.silu(y) if silu else y


def group_norm_given_stats(
  x: Array,
  scale: Array,
  bias: Array,
  mean: Array,
  var: Array,
  epsilon: float,
  silu: bool = False,
  dtype: Any = None,
) -> Array:
  """`group_norm` with the per (batch, group) `mean` and `var` `(B, G)` given rather than taken
  from `x` (B, ..., C): a tile of a volume normalised with the whole volume's statistics."""
  return _apply(x, scale, bias, mean, lax.rsqrt(var + epsilon), silu, dtype)


def _backward(groups, epsilon, silu, dtype, res, g):
  del epsilon, dtype
  x, scale, bias, mean, rstd = res
  c, nd = x.shape[-1], x.ndim
  mean_c, rstd_c = _per_channel(mean, c, nd), _per_channel(rstd, c, nd)
  xhat = (x - mean_c) * rstd_c
  gy = g.astype(xhat.dtype)
  if silu:
    y = _normalize(x, mean_c, rstd_c, scale, bias).astype(g.dtype).astype(xhat.dtype)
    s = 0.5 * jnp.tanh(0.5 * y) + 0.5  # sigmoid(y), written apart so XLA keeps no copy of it
    gy = gy * (s * (1 + y * (1 - s)))
  axes = tuple(range(1, nd - 1))
  sum_g, sum_gx = gy.sum(axis=axes), (gy * xhat).sum(axis=axes)  # (B, C) each
  b, n = x.shape[0], x.size // (x.shape[0] * groups)
  mean_dx = (sum_g * scale).reshape(b, groups, -1).sum(axis=2) / n
  mean_dx_xhat = (sum_gx * scale).reshape(b, groups, -1).sum(axis=2) / n
  dx = rstd_c * (
    gy * scale - _per_channel(mean_dx, c, nd) - xhat * _per_channel(mean_dx_xhat, c, nd)
  )
  return (
    dx.astype(x.dtype),
    sum_gx.sum(axis=0).astype(scale.dtype),
    sum_g.sum(axis=0).astype(bias.dtype),
  )


_recomputing = jax.custom_vjp(_value, nondiff_argnums=(3, 4, 5, 6))
_recomputing.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """`flax.linen.GroupNorm` over channels-last inputs (same parameters), SiLU after if `silu`.

  `dtype` is the computation dtype of the result; statistics are float32, parameters float32.
  `recompute`: see `group_norm` (less memory, see the module docstring).
  """

  num_groups: int
  epsilon: float = 1e-6
  silu: bool = False
  dtype: Any = None
  recompute: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"{c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return group_norm(
      x, scale, bias, self.num_groups, self.epsilon, self.silu, self.dtype, self.recompute
    )

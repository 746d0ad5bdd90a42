"""Stride-1 VALID convolutions with one output channel as matrix products over the taps.

A convolution with one output channel (the autoencoder's image, the discriminators' logits)
leaves XLA:CPU's convolutions too few outputs to run well. Here every kernel tap is a column of
a matrix product instead, and shifted views add the columns up (same function, float32
rounding):
- forward: `Z = x @ W`, one column per (tap, output channel), then `y[p] = sum_t Z[p + t, t]`;
- backward: the cotangent's shifted copies `C[t, q] = g[q - t]`, one row per (tap, output
  channel), give both `dx = C^T @ W` and `dW = C @ x`.
With one output channel this beats `slab_conv` several times over; from two output channels it
is slower (bench/RESULTS.md, "CPU kernel choices", row "one output channel"). Reverse mode only,
like `slab_conv`.

`input_gradient` is the input gradient of any stride-1 VALID convolution the same way:
`Z = g @ W^T`, one column per (tap, input channel), then `dx[p] = sum_t Z[p - t, t]`. It does
only the products the gradient needs, where a full correlation of the cotangent also multiplies
its zero border; `slab_conv` uses it where that border is most of the work.
"""

import itertools

import jax
import jax.numpy as jnp

Array = jax.Array


def _taps(kernel_shape) -> list[tuple[int, ...]]:
  """Every tap offset of a kernel with spatial shape `kernel_shape`, in C order."""
  return list(itertools.product(*(range(k) for k in kernel_shape)))


def _window(offset, size) -> tuple[slice, ...]:
  """Index of the spatial window of `size` at `offset`: all of the batch, the trailing axes
  left whole."""
  return (slice(None), *(slice(o, o + s) for o, s in zip(offset, size)))


def _forward(x: Array, w: Array) -> Array:
  nd = x.ndim - 2
  kernel_shape, (ci, co) = w.shape[:nd], w.shape[nd:]
  out = tuple(s - k + 1 for s, k in zip(x.shape[1:-1], kernel_shape))
  taps = _taps(kernel_shape)
  w_cols = w.reshape(len(taps), ci, co).transpose(1, 0, 2).reshape(ci, len(taps) * co)
  z = jnp.dot(x, w_cols, preferred_element_type=jnp.float32)  # sums in float32 for any dtype
  z = z.reshape(*x.shape[:-1], len(taps), co)
  return sum(z[_window(t, out)][..., i, :] for i, t in enumerate(taps)).astype(x.dtype)


def _cotangent_rows(g: Array, kernel_shape) -> Array:
  """(B, *out, co) -> (taps * co, B * prod(in)): row (t, o) holds g[..., q - t, o] for every
  input position q, zero where q - t falls outside the output."""
  size = tuple(s + k - 1 for s, k in zip(g.shape[1:-1], kernel_shape))
  channels_first = jnp.moveaxis(g, -1, 0)  # (co, B, *out)
  padded = jnp.pad(channels_first, ((0, 0), (0, 0), *[(k - 1, k - 1) for k in kernel_shape]))
  rows = jnp.stack(
    [
      padded[(slice(None), *_window([k - 1 - o for k, o in zip(kernel_shape, t)], size))]
      for t in _taps(kernel_shape)
    ]
  )  # (taps, co, B, *in)
  return rows.reshape(rows.shape[0] * rows.shape[1], -1)


def input_gradient(g: Array, w: Array) -> Array:
  """Input gradient of a stride-1 VALID convolution with kernel `w` (*k, ci, co) for the
  cotangent `g` (B, *out, co): (B, *(out + k - 1), ci), summed in float32 for any dtype."""
  nd = g.ndim - 2
  kernel_shape, (ci, co) = w.shape[:nd], w.shape[nd:]
  taps = _taps(kernel_shape)
  w_cols = jnp.moveaxis(w, -1, 0).reshape(co, len(taps) * ci)
  z = jnp.dot(g, w_cols, preferred_element_type=jnp.float32)
  z = z.reshape(*g.shape[:-1], len(taps), ci)
  dx = sum(
    jnp.pad(z[..., i, :], ((0, 0), *[(o, k - 1 - o) for o, k in zip(t, kernel_shape)], (0, 0)))
    for i, t in enumerate(taps)
  )
  return dx.astype(g.dtype)


@jax.custom_vjp
def conv_valid(x: Array, kernel: Array) -> Array:
  """Stride-1 VALID convolution of channels-last `x` (B, *spatial, ci) with `kernel`
  (*k, ci, co), for any number of spatial axes. Any co gives the same function; only co = 1
  runs faster than the slab convolutions."""
  return _forward(x, kernel)


def _conv_valid_bwd(res, g):
  x, w = res
  nd = x.ndim - 2
  ci = x.shape[-1]
  rows = _cotangent_rows(g, w.shape[:nd])  # (taps * co, B * prod(in))
  w_rows = jnp.moveaxis(w, -1, nd).reshape(rows.shape[0], ci)  # (taps * co, ci)
  dx = jax.lax.dot_general(
    rows, w_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
  ).reshape(x.shape)
  dw = jnp.dot(rows, x.reshape(-1, ci), preferred_element_type=jnp.float32)
  dw = dw.reshape(*w.shape[:nd], w.shape[-1], ci)
  return dx.astype(x.dtype), jnp.moveaxis(dw, -1, nd).astype(w.dtype)


conv_valid.defvjp(lambda x, w: (conv_valid(x, w), (x, w)), _conv_valid_bwd)

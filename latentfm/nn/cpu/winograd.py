"""Winograd's minimal filtering F(m, r) along one axis (axis 1 of the arrays).

An r-tap correlation `y[d] = sum_a x[d + a] w[a]` gives m outputs per tile of m + r - 1 inputs
with m + r - 1 products instead of m * r, `y = A^T [(G w) * (B^T x)]` per tile (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016; the matrices come from Toom-Cook
interpolation at the points 0, 1, -1, 2, -2, ... and infinity). Here a "product" is any
bilinear map applied slice by slice: `slab_conv` makes it a 2D convolution over (H, W), or a 2D
kernel gradient, so that a 3D convolution and its input and kernel gradients run a fraction of
the 2D convolutions of the direct form (F(4, 3): half). The function is the same; float32
rounding differs from a direct sum by about 1e-6 of the output's scale (see
`tests/test_winograd.py`).
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_POINTS = (0, 1, -1, 2, -2, 0.5, -0.5)


@functools.cache
def matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B^T, G, A^T) of F(m, r): shapes (n, n), (n, r) and (m, n) with n = m + r - 1 points."""
  n = m + r - 1
  if not (m >= 1 and r >= 1 and n - 1 <= len(_POINTS)):
    raise ValueError(f"F({m}, {r}) needs {n - 1} finite points; {len(_POINTS)} are defined")
  points = _POINTS[: n - 1]
  at, g = np.zeros((m, n)), np.zeros((n, r))
  for k, p in enumerate(points):
    at[:, k] = [p**i for i in range(m)]
    g[k] = [p**a / np.prod([p - q for q in points if q != p]) for a in range(r)]
  at[m - 1, n - 1] = g[n - 1, r - 1] = 1  # the point at infinity
  # B^T solves sum_k A^T[j, k] G[k, a] B^T[k, t] = [t == j + a] for all j, a, t.
  system = np.einsum("jk,ka->jak", at, g).reshape(m * r, n)
  target = np.array([[float(t == j + a) for t in range(n)] for j in range(m) for a in range(r)])
  bt = np.linalg.lstsq(system, target, rcond=None)[0]
  if not np.allclose(system @ bt, target, atol=1e-9):
    raise ValueError(f"no Winograd F({m}, {r}) for the points {points}")
  return np.where(np.abs(bt - np.round(bt)) < 1e-9, np.round(bt), bt), g, at


def _combine(coefficients: Sequence[float], arrays: Sequence[Array]) -> Array:
  """sum_i c_i * a_i over the nonzero c_i, without multiplying by +-1."""
  total = None
  for c, a in zip(coefficients, arrays):
    if c == 0:
      continue
    term = a if c == 1 else -a if c == -1 else a * np.asarray(c, a.dtype)
    total = term if total is None else total + term
  return total


def tiles_needed(n: int, m: int) -> int:
  """Tiles of m outputs for `n` outputs; the input then needs m * tiles + r - 1 slices."""
  return -(-n // m)


def _tile_slices(x: Array, step: int, count: int, q: int) -> list[Array]:
  """Slice i of each of q tiles starting every `step` slices, i < count: arrays (B, q, ...)."""
  return [x[:, i : i + step * (q - 1) + 1 : step] for i in range(count)]


def input_tiles(x: Array, m: int, r: int) -> list[Array]:
  """B^T x: (B, m * q + r - 1, ...) -> m + r - 1 arrays (B, q, ...)."""
  q = (x.shape[1] - r + 1) // m
  if q < 1 or x.shape[1] != m * q + r - 1:
    raise ValueError(f"axis 1 has {x.shape[1]} slices, not {m} * q + {r - 1}")
  return [_combine(row, _tile_slices(x, m, m + r - 1, q)) for row in matrices(m, r)[0]]


def kernel_points(w: Array, m: int) -> list[Array]:
  """G w: (r, ...) -> m + r - 1 arrays (...)."""
  return [_combine(row, list(w)) for row in matrices(m, w.shape[0])[1]]


def outputs(products: Sequence[Array], m: int, r: int) -> Array:
  """A^T p, tiles interleaved: m + r - 1 arrays (B, q, ...) -> (B, m * q, ...)."""
  out = jnp.stack([_combine(row, products) for row in matrices(m, r)[2]], axis=2)
  return out.reshape(out.shape[0], -1, *out.shape[3:])


def kernel_gradient_tiles(x: Array, g: Array, r: int, t: int) -> tuple[list[Array], list[Array]]:
  """F(r, t) for the r sums `dw[a] = sum_d x[d + a] * g[d]` (a kernel gradient along axis 1).

  The cotangent `g` (B, t * q, ...), in q tiles of t slices, is the filter and the input `x`
  (B, t * q + r - 1, ...) the signal. Returns (B^T x, G g): t + r - 1 arrays (B, q, ...) each;
  `kernel_gradient_outputs` of their products, each summed over the batch and tiles, is dw.
  """
  q = g.shape[1] // t
  if q < 1 or g.shape[1] != t * q or x.shape[1] != t * q + r - 1:
    raise ValueError(
      f"{g.shape[1]} cotangent and {x.shape[1]} input slices are not {t} * q and {t} * q + {r - 1}"
    )
  bt, gm, _ = matrices(r, t)
  xs, gs = _tile_slices(x, t, t + r - 1, q), _tile_slices(g, t, t, q)
  return [_combine(row, xs) for row in bt], [_combine(row, gs) for row in gm]


def kernel_gradient_outputs(products: Sequence[Array], r: int, t: int) -> Array:
  """A^T p of F(r, t): t + r - 1 arrays (...) -> (r, ...)."""
  return jnp.stack([_combine(row, products) for row in matrices(r, t)[2]])

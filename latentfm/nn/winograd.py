"""Winograd's minimal filtering F(4, 3) along one axis (axis 1 of the arrays).

A 3-tap correlation `y[d] = sum_a x[d + a] w[a]` gives 4 outputs per tile of 6 inputs with 6
products instead of 12, `y = A^T [(G w) * (B^T x)]` per tile (Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks", 2016). Here a "product" is any bilinear map applied slice
by slice: `slab_conv` makes it a 2D convolution over (H, W), so that a 3x3x3 convolution and
its input gradient run half of the 2D convolutions of the direct form. The function is the
same; float32 rounding differs from a direct sum by about 1e-6 of the output's scale (see
`tests/test_winograd.py`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TILE = 4  # outputs per tile
TAPS = 3  # kernel taps
POINTS = TILE + TAPS - 1  # products per tile

# Interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)


def _combine(coefficients: Sequence[float], arrays: Sequence[Array]) -> Array:
  """sum_i c_i * a_i over the nonzero c_i, without multiplying by +-1."""
  total = None
  for c, a in zip(coefficients, arrays):
    if c == 0:
      continue
    term = a if c == 1 else -a if c == -1 else a * np.asarray(c, a.dtype)
    total = term if total is None else total + term
  return total


def tiles_needed(n: int) -> int:
  """Tiles for `n` outputs; the input then needs TILE * tiles + TAPS - 1 slices."""
  return -(-n // TILE)


def input_tiles(x: Array) -> list[Array]:
  """B^T x: (B, TILE * q + 2, ...) -> POINTS arrays (B, q, ...)."""
  q = (x.shape[1] - TAPS + 1) // TILE
  if x.shape[1] != TILE * q + TAPS - 1:
    raise ValueError(f"axis 1 has {x.shape[1]} slices, not {TILE} * q + {TAPS - 1}")
  slices = [x[:, i:i + TILE * (q - 1) + 1:TILE] for i in range(POINTS)]
  return [_combine(row, slices) for row in _BT]


def kernel_points(w: Array) -> list[Array]:
  """G w: (TAPS, ...) -> POINTS arrays (...)."""
  return [_combine(row, list(w)) for row in _G]


def outputs(products: Sequence[Array]) -> Array:
  """A^T m, tiles interleaved: POINTS arrays (B, q, ...) -> (B, TILE * q, ...)."""
  out = jnp.stack([_combine(row, products) for row in _AT], axis=2)
  return out.reshape(out.shape[0], -1, *out.shape[3:])

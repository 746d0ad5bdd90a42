"""Winograd F(m, r) depth tiles: the transforms, and the slab convolutions that use them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import assert_close as _assert_close
from testing_arrays import normal as _normal
from testing_arrays import value_and_grads

from latentfm.nn.cpu import slab_conv, winograd


@pytest.mark.parametrize("m,r", [(4, 3), (2, 3), (3, 2), (3, 4), (2, 2), (4, 2)])
def test_transforms_compute_a_correlation(m, r):
  """Products as plain multiplications: A^T[(G w) * (B^T x)] is y[d] = sum_a x[d + a] w[a]."""
  q = 3
  x, w = _normal((2, m * q + r - 1, 5), 1), _normal((r, 5), 2)
  products = [
    t * v
    for t, v in zip(
      winograd.input_tiles(jnp.asarray(x), m, r), winograd.kernel_points(jnp.asarray(w), m)
    )
  ]
  direct = sum(x[:, a : a + m * q] * w[a] for a in range(r))
  _assert_close(winograd.outputs(products, m, r), direct)


def test_f43_matrices_are_lavins():
  """The Toom-Cook construction gives the published F(4, 3) input transform."""
  bt = winograd.matrices(4, 3)[0]
  np.testing.assert_array_equal(
    bt,
    [
      [4, 0, -5, 0, 1, 0],
      [0, -4, -4, 1, 1, 0],
      [0, 4, -4, -1, 1, 0],
      [0, -2, -1, 2, 1, 0],
      [0, 2, -1, -2, 1, 0],
      [0, 4, 0, -5, 0, 1],
    ],
  )


def test_tiles_needed_and_partial_tiles_rejected():
  assert [winograd.tiles_needed(n, 4) for n in (1, 4, 5, 64, 66)] == [1, 1, 2, 16, 17]
  with pytest.raises(ValueError, match="not 4 \\* q \\+ 2"):
    winograd.input_tiles(jnp.zeros((1, 9, 2)), 4, 3)
  with pytest.raises(ValueError, match="needs 9 finite points"):
    winograd.matrices(6, 5)


def _convolutions(f, *args) -> int:
  return str(jax.make_jaxpr(f)(*args)).count("conv_general_dilated")


@pytest.mark.parametrize(
  "depth,kd,ci,co,convs",
  [
    (8, 3, 8, 12, 6),
    (13, 3, 9, 8, 6),
    (10, 3, 12, 8, 6),  # F(4, 3)
    (7, 2, 8, 12, 4),
    (9, 2, 8, 8, 4),  # F(3, 2)
    (6, 4, 9, 8, 6),
    (8, 4, 8, 10, 6),
  ],
)  # F(3, 4)
def test_winograd_slab_conv_matches_lax(slab_input_gradient, depth, kd, ci, co, convs):
  """Output, input and kernel gradients, also where the slices are not whole tiles."""
  x, w = _normal((2, depth + kd - 1, 6, 7, ci), 5), _normal((kd, 3, 2, ci, co), 6)
  ct = _normal((2, depth, 4, 6, co), 7)
  assert _convolutions(slab_conv._slab_fwd, x, w) == convs  # one per Winograd point
  (y, grads), (y_ref, grads_ref) = (
    value_and_grads(f, x, w, ct) for f in (slab_conv.conv_valid, slab_conv.lax_valid)
  )
  _assert_close(y, y_ref)
  for grad, ref in zip(grads, grads_ref):
    _assert_close(grad, ref)


def test_winograd_rounding_stays_at_float32_scale():
  """Against a float64 reference: the error is a few 1e-6 of the output's scale."""
  x, w = _normal((1, 14, 6, 6, 16), 8), _normal((3, 3, 3, 16, 16), 9)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  exact = sum(
    np.einsum("bdhwi,io->bdhwo", x64[:, a : a + 12, i : i + 4, j : j + 4], w64[a, i, j])
    for a in range(3)
    for i in range(3)
    for j in range(3)
  )
  error = np.abs(np.asarray(jax.jit(slab_conv._slab_fwd)(x, w)) - exact).max()
  assert error < 1e-5 * np.abs(exact).max()


@pytest.mark.parametrize(
  "depth,kd,ci,co,dtype",
  [
    (5, 3, 8, 8, jnp.float32),  # few slices
    (8, 3, 4, 8, jnp.float32),  # few channels
    (8, 3, 8, 8, jnp.bfloat16),
    (8, 2, 16, 8, jnp.float32),  # two taps, shrinking
    (8, 5, 8, 8, jnp.float32),
  ],
)  # five taps: no tiling
def test_winograd_only_where_it_pays(depth, kd, ci, co, dtype):
  """Direct slabs (one 2D convolution) for few slices or channels, bfloat16, 2-tap kernels that
  shrink the channels and depths without a tiling."""
  x = jnp.asarray(_normal((1, depth + kd - 1, 5, 5, ci), 10), dtype)
  w = jnp.asarray(_normal((kd, 3, 3, ci, co), 11), dtype)
  assert _convolutions(slab_conv._slab_fwd, x, w) == 1


@pytest.mark.parametrize("r,t", [(3, 4), (4, 3)])
def test_kernel_gradient_transforms_compute_the_tap_sums(r, t):
  """Products summed over the batch and tiles: A^T[sum (G g) * (B^T x)] is the r sums
  dw[a] = sum_d x[d + a] g[d]."""
  q = 3
  x, g = _normal((2, t * q + r - 1, 5), 3), _normal((2, t * q, 5), 4)
  u, v = winograd.kernel_gradient_tiles(x, g, r, t)
  products = [(a * b).sum(axis=(0, 1)) for a, b in zip(u, v)]
  direct = jnp.stack([(x[:, a : a + t * q] * g).sum(axis=(0, 1)) for a in range(r)])
  _assert_close(winograd.kernel_gradient_outputs(products, r, t), direct)
  with pytest.raises(ValueError, match="not 4 \\* q"):
    winograd.kernel_gradient_tiles(x[:, 1:], g, r, 4)


@pytest.mark.parametrize(
  "depth,kd,ci,co,tiled",
  [
    (7, 3, 64, 72, True),  # F(3, 4), a partial last tile
    (6, 4, 64, 64, True),  # F(4, 3)
    (8, 3, 32, 64, False),  # too few channels: direct
    (8, 2, 64, 64, False),  # two taps: direct
    (5, 3, 64, 64, False),
  ],
)  # few slices: direct
def test_winograd_kernel_gradient_matches_lax(depth, kd, ci, co, tiled):
  x, w = _normal((1, depth + kd - 1, 4, 5, ci), 12), _normal((kd, 3, 2, ci, co), 13) / 10
  ct = _normal((1, depth, 2, 4, co), 14)
  assert slab_conv._winograd_dw_applies(depth, kd, ci, co, jnp.float32) == tiled
  assert not slab_conv._winograd_dw_applies(depth, kd, ci, co, jnp.bfloat16)
  (_, (_, dw)), (_, (_, dw_ref)) = (
    value_and_grads(f, x, w, ct) for f in (slab_conv.conv_valid, slab_conv.lax_valid)
  )
  _assert_close(dw, dw_ref)
  if kd in slab_conv._WINOGRAD_DW_TILE:  # the tiles give the same values where not chosen too
    _assert_close(slab_conv._winograd_dw(x, ct, kd), dw_ref)

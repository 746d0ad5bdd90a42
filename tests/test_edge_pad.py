"""`latentfm.nn.cpu.edge_pad` against `jnp.pad(mode="edge")` and its autodiff gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import normal as _normal

from latentfm.nn.cpu import edge_pad as ep


@pytest.mark.parametrize(
  "shape, widths",
  [
    ((2, 5, 4, 6, 3), ((1, 1), (1, 1), (1, 1))),  # the convs' case
    ((1, 6, 5, 7, 2), ((1, 2), (0, 0), (2, 1))),  # asymmetric, one axis untouched
    ((2, 4, 3, 5, 1), ((0, 1), (3, 0), (1, 1))),  # widths larger than the border plane
    ((2, 7, 6, 3), ((1, 1), (2, 1))),  # 2D
    ((3, 9, 2), ((2, 1),)),  # 1D
    ((1, 1, 4, 2, 2), ((1, 1), (1, 1), (1, 1))),  # size-1 and size-2 axes: plain autodiff
  ],
)
def test_value_and_gradient_match_jnp_pad(shape, widths):
  x = _normal(shape)
  reference = lambda v: jnp.pad(v, ((0, 0), *widths, (0, 0)), mode="edge")
  ct = _normal(reference(x).shape, 1)
  got = jax.jit(jax.value_and_grad(lambda v: (ep.edge_pad(v, widths) * ct).sum()))(x)
  want = jax.value_and_grad(lambda v: (reference(v) * ct).sum())(x)
  np.testing.assert_array_equal(ep.edge_pad(x, widths), reference(x))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_concat_version_matches_jnp_pad():
  x, widths = _normal((2, 3, 4, 5, 2)), ((2, 1), (0, 1), (1, 0))
  np.testing.assert_array_equal(
    ep.edge_pad_concat(x, widths), jnp.pad(x, ((0, 0), *widths, (0, 0)), mode="edge")
  )


def test_zero_widths_return_the_input():
  x = _normal((1, 3, 3, 3, 1))
  assert ep.edge_pad(x, ((0, 0),) * 3) is x


@pytest.mark.parametrize("widths", [((1, 1),) * 2, ((1, -1), (0, 0), (0, 0))])
def test_bad_widths_raise(widths):
  with pytest.raises(ValueError, match="edge_pad"):
    ep.edge_pad(_normal((1, 3, 3, 3, 1)), widths)

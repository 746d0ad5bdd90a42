"""Tests for the same-pad convolutions and residual block."""

import itertools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import normal as _normal

from latentfm.nn import layers


def _init_apply(module, x, seed=0):
  variables = module.init(jax.random.key(seed), x)
  return variables, module.apply(variables, x)


@pytest.mark.parametrize(
  "shape,k,s,expected",
  [
    ((1, 8, 8, 8, 2), 3, 1, (1, 8, 8, 8, 5)),
    ((1, 8, 8, 8, 2), 4, 2, (1, 4, 4, 4, 5)),
    ((1, 8, 8, 8, 2), 4, (2, 1, 2), (1, 4, 8, 4, 5)),
    ((2, 8, 6, 2), 4, 2, (2, 4, 3, 5)),
    ((2, 8, 6, 2), 1, 1, (2, 8, 6, 5)),
  ],
)
def test_same_pad_conv_shapes(shape, k, s, expected):
  _, y = _init_apply(layers.SamePadConv(5, k, s), jnp.ones(shape))
  assert y.shape == expected


def test_same_pad_widths_split_ceil_left():
  assert layers.same_pad_widths((3, 4, 4, 5), (1, 2, 1, 2)) == ((1, 1), (1, 1), (2, 1), (2, 1))


@pytest.mark.parametrize("k,s", [(3, 1), (4, 2)])
def test_same_pad_conv_constant_input_gives_constant_output(k, s):
  x = jnp.full((1, 8, 8, 8, 3), 0.7)
  variables, y = _init_apply(layers.SamePadConv(4, k, s), x)
  p = variables["params"]
  expected = 0.7 * p["kernel"].sum(axis=(0, 1, 2, 3)) + p["bias"]
  # Replicate padding: the borders see the same constant as the interior (zero padding would not).
  np.testing.assert_allclose(y, jnp.broadcast_to(expected, y.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s", [(3, 1), (4, 2), (4, (2, 1, 2))])
def test_same_pad_conv_matches_manual_edge_pad(k, s):
  x = _normal((2, 8, 8, 8, 3), 1)
  variables, y = _init_apply(layers.SamePadConv(4, k, s), x)
  p = variables["params"]
  st = s if isinstance(s, tuple) else (s,) * 3
  pads = [((k - t + 1) // 2, (k - t) // 2) for t in st]
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode="edge")
  ref = (
    lax.conv_general_dilated(
      xp, p["kernel"], st, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + p["bias"]
  )
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "shape,s,expected",
  [
    ((1, 4, 4, 4, 3), 2, (1, 8, 8, 8, 2)),
    ((2, 4, 3, 5, 3), (2, 1, 2), (2, 8, 3, 10, 2)),
    ((1, 4, 6, 3), 2, (1, 8, 12, 2)),
  ],
)
def test_same_pad_conv_transpose_shapes(shape, s, expected):
  variables, y = _init_apply(layers.SamePadConvTranspose(2, 4, s), jnp.ones(shape))
  assert y.shape == expected
  assert variables["params"]["kernel"].shape == (4,) * (len(shape) - 2) + (3, 2)


def _numpy_same_pad_conv_transpose(x, kernel, bias, k=4, s=2):
  """PyTorch semantics written out: edge pad, scatter every input voxel, crop k - 1."""
  lo, hi = (k - s + 1) // 2, (k - s) // 2
  xp = np.pad(x, [(lo, hi)] * 3 + [(0, 0)], mode="edge")
  n = xp.shape[0]
  full = np.zeros(((n - 1) * s + k,) * 3 + (kernel.shape[-1],))
  for i, j, l in itertools.product(range(n), repeat=3):
    for a, b, c in itertools.product(range(k), repeat=3):
      full[s * i + a, s * j + b, s * l + c] += xp[i, j, l] @ kernel[a, b, c]
  crop = k - 1
  return full[crop:-crop, crop:-crop, crop:-crop] + bias


def test_same_pad_conv_transpose_matches_numpy_scatter():
  x = np.random.default_rng(0).normal(size=(1, 4, 4, 4, 2)).astype(np.float32)
  variables, y = _init_apply(layers.SamePadConvTranspose(3, 4, 2), jnp.asarray(x))
  p = jax.tree.map(np.asarray, variables["params"])
  ref = _numpy_same_pad_conv_transpose(x[0], p["kernel"], p["bias"])
  assert y.shape == (1, 8, 8, 8, 3)
  np.testing.assert_allclose(y[0], ref, rtol=1e-4, atol=1e-5)


def test_conv_transpose_is_adjoint_of_conv():
  """<conv(x, W), y> == <x, conv_transpose(y, W^T)> (in/out axes swapped), same stride/padding."""
  w = _normal((4, 4, 4, 2, 3), 2)
  x = _normal((1, 6, 6, 6, 2), 3)
  cx = layers.conv(x, w, (2, 2, 2), ((1, 1),) * 3)
  y = _normal(cx.shape, 4)
  ty = layers.conv_transpose(y, w.swapaxes(-1, -2), (2, 2, 2), (1, 1, 1))
  assert ty.shape == x.shape
  np.testing.assert_allclose(jnp.vdot(cx, y), jnp.vdot(x, ty), rtol=1e-4)


def test_group_norm_groups():
  assert layers.GroupNorm(64).num_groups == 32
  assert layers.GroupNorm(16).num_groups == 16
  assert layers.GroupNorm(64, max_groups=8).num_groups == 8
  assert layers.GroupNorm(8).epsilon == 1e-6


def test_res_block_names_shape_and_identity():
  x = _normal((1, 4, 4, 4, 8), 5)
  block = layers.ResBlock()
  variables, y = _init_apply(block, x)
  assert y.shape == x.shape
  assert set(variables["params"]) == {"norm1", "conv1", "norm2", "conv2"}
  assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8, 8)
  zeroed = jax.tree.map(lambda a: a, variables)
  zeroed["params"]["conv2"] = jax.tree.map(jnp.zeros_like, zeroed["params"]["conv2"])
  np.testing.assert_allclose(block.apply(zeroed, x), x, atol=1e-6)


def test_zero_pad_conv_uses_zero_padding():
  x = jnp.ones((1, 4, 4, 1))
  variables, y = _init_apply(layers.ZeroPadConv(1, 4, 2, 2), x)
  assert y.shape == (1, 3, 3, 1)
  p = variables["params"]
  np.testing.assert_allclose(y[0, 1, 1, 0], p["kernel"].sum() + p["bias"][0], rtol=1e-5)
  assert abs(float(y[0, 0, 0, 0] - y[0, 1, 1, 0])) > 1e-6  # corner sees zeros

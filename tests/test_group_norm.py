"""GroupNorm (+ SiLU) with the memory-light VJP against flax's GroupNorm differentiated by XLA."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import max_relative_error, normal

from latentfm.nn import layers
from latentfm.nn.group_norm import GroupNorm


def _inputs(shape):
  """An input off zero mean and unit scale, varied parameters, and a cotangent."""
  rng = np.random.default_rng(2)
  c = shape[-1]
  params = {
    "params": {
      "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
      "bias": jnp.asarray(rng.uniform(-1, 1, c), jnp.float32),
    }
  }
  return normal(shape, 0, 0.7, 2.0), params, normal(shape, 1)


def _flax(groups, silu, dtype=None):
  norm = nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)
  return lambda p, x: nn.silu(norm.apply(p, x)) if silu else norm.apply(p, x)


def _ours(groups, silu, dtype=None, recompute=True):
  return GroupNorm(groups, 1e-6, silu, dtype, recompute).apply


def _value_and_grads(fn, params, x, cotangent):
  y, vjp = jax.vjp(fn, params, x)
  dp, dx = vjp(cotangent.astype(y.dtype))
  return y, dp["params"]["scale"], dp["params"]["bias"], dx


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize(
  "shape,groups,silu",
  [
    ((2, 6, 5, 4, 32), 32, True),
    ((2, 6, 5, 4, 64), 32, True),
    ((2, 4, 4, 4, 16), 4, False),
    ((3, 8, 6, 8), 2, True),
  ],
)
def test_value_and_gradients_match_flax(shape, groups, silu, recompute):
  x, params, cotangent = _inputs(shape)
  ours = _ours(groups, silu, recompute=recompute)
  ref = jax.jit(lambda p, x: _value_and_grads(_flax(groups, silu), p, x, cotangent))(params, x)
  got = jax.jit(lambda p, x: _value_and_grads(ours, p, x, cotangent))(params, x)
  for name, a, b in zip(("value", "scale grad", "bias grad", "input grad"), got, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert max_relative_error(a, b) < 2e-6, (name, max_relative_error(a, b))


def test_same_parameters_as_flax():
  x, _, _ = _inputs((1, 4, 4, 4, 8))
  ours = GroupNorm(4, silu=True).init(jax.random.PRNGKey(0), x)
  ref = nn.GroupNorm(num_groups=4, epsilon=1e-6).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  jax.tree.map(np.testing.assert_array_equal, ours, ref)


def test_bfloat16_as_accurate_as_flax():
  """In bfloat16 both are compared to the float32 function; the backward pass here runs in
  float32, so its gradients are at least as close as those of flax's bfloat16 backward."""
  x, params, cotangent = _inputs((2, 6, 6, 6, 32))
  exact = _value_and_grads(_flax(8, True), params, x, cotangent)
  ref = _value_and_grads(_flax(8, True, jnp.bfloat16), params, x.astype(jnp.bfloat16), cotangent)
  got = _value_and_grads(_ours(8, True, jnp.bfloat16), params, x.astype(jnp.bfloat16), cotangent)
  assert got[0].dtype == ref[0].dtype == jnp.bfloat16
  for name, a, b, e in zip(("value", "scale grad", "bias grad", "input grad"), got, ref, exact):
    ours, flax_error = max_relative_error(a, e), max_relative_error(b, e)
    assert ours <= 1.01 * flax_error + 1e-6, (name, ours, flax_error)


def test_backward_keeps_less_memory():
  """A stack of GroupNorm + SiLU layers: the compiled gradient keeps each layer's residuals
  until the backward pass reaches it, and needs less temporary memory than with flax's."""
  x, params, cotangent = _inputs((2, 16, 16, 16, 32))

  def temp_bytes(layer):
    def loss(p, x):
      for i in range(4):
        x = layer(p, x) * (1.0 + 0.1 * i)
      return jnp.sum(x * cotangent)

    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ours, ref = temp_bytes(_ours(32, True)), temp_bytes(_flax(32, True))
  assert ours < 0.8 * ref, (ours, ref)


def test_channels_must_split_into_groups():
  with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
    GroupNorm(4).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 6)))


class _FlaxNormResBlock(nn.Module):
  """`layers.ResBlock` with flax's GroupNorm and a separate SiLU (the same function)."""

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.GroupNorm(num_groups=32, epsilon=1e-6, name=name)
    h = layers.SamePadConv(x.shape[-1], 3, 1, name="conv1")(nn.silu(norm("norm1")(x)))
    return x + layers.SamePadConv(x.shape[-1], 3, 1, name="conv2")(nn.silu(norm("norm2")(h)))


def test_residual_blocks_keep_less_memory():
  """Two residual blocks, forward + backward: the SiLU's sigmoid is recomputed in the backward
  pass rather than kept (XLA would share one computed the same way as the forward's)."""
  x = _inputs((2, 16, 16, 16, 32))[0]

  def temp_bytes(block):
    model = nn.Sequential([block(name="b0"), block(name="b1")])
    variables = model.init(jax.random.PRNGKey(0), x)
    loss = lambda v, x: jnp.sum(model.apply(v, x) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(variables, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ours = temp_bytes(functools.partial(layers.ResBlock, recompute_norms=True))
  ref = temp_bytes(_FlaxNormResBlock)
  assert ours < 0.8 * ref, (ours, ref)

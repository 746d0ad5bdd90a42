"""Compiler options of the training steps."""

import jax
import jax.numpy as jnp
import numpy as np

from latentfm.nn import layers
from latentfm.train import compiler


def test_cpu_options_compile_and_keep_values():
  options = compiler.compiler_options()
  assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  block = layers.ResBlock(norm_groups=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 5, 7, 8)), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x)
  grad = lambda p, v: jax.grad(lambda p, v: (block.apply(p, v) ** 2).sum(), (0, 1))(p, v)
  with_options = jax.jit(grad, compiler_options=options)(params, x)
  default = jax.jit(grad)(params, x)
  for a, b in zip(jax.tree.leaves(with_options), jax.tree.leaves(default)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_unknown_option_falls_back_to_defaults(monkeypatch, caplog):
  monkeypatch.setattr(compiler, "_CPU_OPTIONS", {"xla_cpu_no_such_option_for_tests": "1"})
  compiler.compiler_options.cache_clear()
  try:
    assert compiler.compiler_options() is None
    assert "rejected" in caplog.text
  finally:
    compiler.compiler_options.cache_clear()


def test_jit_train_step_matches_jax_jit():
  f = lambda x, y: (jnp.sin(x) * y).sum()
  x, y = jnp.arange(6.0), jnp.full((6,), 0.5)
  np.testing.assert_allclose(compiler.jit_train_step(f)(x, y), jax.jit(f)(x, y), rtol=1e-6)
  donated = compiler.jit_train_step(lambda x: x * 2, donate_argnums=0)
  np.testing.assert_array_equal(donated(jnp.ones(3)), np.full(3, 2.0))

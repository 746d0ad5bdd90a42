"""Tests for the 2D / 3D PatchGAN discriminators."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs.vqgan import get_config
from latentfm.nn.discriminators import PatchDiscriminator, make_discriminators, output_size


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _shapes(disc, x_shape):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  return jax.eval_shape(disc.init, jax.random.key(0), x)


def test_thesis_parameter_counts():
  image, volume = make_discriminators(get_config("thesis").model)
  assert image.spatial_dims == 2 and volume.spatial_dims == 3
  assert _count(_shapes(image, (1, 16, 16, 1))["params"]) == 2_764_481
  v = _shapes(volume, (1, 16, 16, 16, 1))
  assert _count(v["params"]) == 11_049_665
  assert set(v["batch_stats"]) == {"norm_1", "norm_2", "norm_3"}


def test_channel_cap_at_512():
  p = _shapes(PatchDiscriminator(64, 4, spatial_dims=2), (1, 32, 32, 1))["params"]
  assert p["conv_3"]["kernel"].shape == (4, 4, 256, 512)
  assert p["conv_4"]["kernel"].shape == (4, 4, 512, 512)
  assert p["conv_out"]["kernel"].shape == (4, 4, 512, 1)


def test_2d_features_and_logits():
  disc = PatchDiscriminator(channels=8, num_layers=3, spatial_dims=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)), jnp.float32)
  variables = jax.jit(disc.init)(jax.random.key(0), x)
  (logits, feats), upd = jax.jit(lambda v: disc.apply(v, x, train=True, mutable=["batch_stats"]))(
    variables
  )
  assert logits.shape == (2, output_size(32, 3), output_size(32, 3), 1) == (2, 7, 7, 1)
  assert len(feats) == 4
  assert [f.shape[-1] for f in feats] == [8, 16, 32, 64]
  assert [f.shape[1] for f in feats] == [17, 9, 5, 6]
  # Training mode updates the running statistics; eval mode uses them and mutates nothing.
  old = variables["batch_stats"]["norm_1"]["mean"]
  assert float(jnp.max(jnp.abs(upd["batch_stats"]["norm_1"]["mean"] - old))) > 0
  logits_eval, feats_eval = jax.jit(disc.apply)({**variables, **upd}, x)
  assert logits_eval.shape == logits.shape and len(feats_eval) == 4


def test_3d_features_and_logits():
  disc = PatchDiscriminator(channels=4, num_layers=2, spatial_dims=3)
  x = jnp.zeros((1, 16, 16, 16, 1))
  (logits, feats), _ = jax.jit(lambda k: disc.init_with_output(k, x))(jax.random.key(0))
  assert logits.shape == (1, 7, 7, 7, 1)
  assert len(feats) == 3
  assert [f.shape for f in feats] == [(1, 9, 9, 9, 4), (1, 5, 5, 5, 8), (1, 6, 6, 6, 16)]


def test_bfloat16_compute_float32_parameters_and_outputs():
  disc = PatchDiscriminator(channels=4, num_layers=2, spatial_dims=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)), jnp.float32)
  variables = jax.jit(disc.init)(jax.random.key(0), x)
  half = disc.clone(dtype=jnp.bfloat16)
  run = lambda d: jax.jit(lambda v: d.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  (logits, feats), stats = run(disc)
  (logits_h, feats_h), stats_h = run(half)
  assert logits_h.dtype == jnp.float32 and all(f.dtype == jnp.float32 for f in feats_h)
  assert all(
    a.dtype == jnp.float32
    for a in jax.tree.leaves((stats_h, jax.eval_shape(half.init, jax.random.key(0), x)))
  )
  err = float(jnp.max(jnp.abs(logits_h - logits)))
  assert 0 < err < 0.05 * float(jnp.max(jnp.abs(logits)))

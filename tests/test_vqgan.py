"""Tests for the VQ-GAN autoencoder and its parameter breakdown."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs.vqgan import get_config
from latentfm.nn import vqgan


def _tiny_config(downsample=(4, 4, 4)) -> ml_collections.ConfigDict:
  c = get_config("thesis").model
  c.n_hiddens = 4
  c.downsample = downsample
  c.embedding_dim = 4
  c.n_codes = 32
  return c


@pytest.fixture(scope="module")
def tiny():
  """One-stage model: the smallest graph that exercises every module (fast to compile)."""
  model = vqgan.VQGAN.from_config(_tiny_config((2, 2, 2)))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 16, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  return model, variables, x


def test_parameter_breakdown_thesis_exact():
  full = vqgan.parameter_breakdown(get_config("thesis"))
  assert sum(v for k, v in full.items() if k != "lpips") == 15_205_227  # total trainable
  assert (
    vqgan.parameter_breakdown(get_config("thesis").model)
    == full
    == {
      "encoder": 441_568,
      "decoder": 948_417,
      "pre_vq_conv": 520,
      "post_vq_conv": 576,
      "codebook": 0,
      "image_discriminator": 2_764_481,
      "volume_discriminator": 11_049_665,
      "lpips": 14_716_160,
    }
  )


def test_stage_strides():
  assert vqgan.stage_strides((4, 4, 4)) == [(2, 2, 2), (2, 2, 2)]
  assert vqgan.stage_strides((2, 2, 2)) == [(2, 2, 2)]
  assert vqgan.stage_strides((4, 4, 2)) == [(2, 2, 2), (2, 2, 1)]
  with pytest.raises(ValueError):
    vqgan.stage_strides((3, 3, 3))


def _shapes(downsample, x_shape):
  model = vqgan.VQGAN.from_config(_tiny_config(downsample))
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  return jax.eval_shape(model.init_with_output, jax.random.key(0), x)


def test_two_stage_layout_and_shapes():
  out, variables = _shapes((4, 4, 4), (2, 16, 16, 16, 1))
  assert out["recon"].shape == (2, 16, 16, 16, 1)
  assert out["latent"].shape == (2, 4, 4, 4, 4)
  assert out["indices"].shape == (2, 4, 4, 4)
  assert set(variables) == {"params", "codebook"}
  p = variables["params"]
  assert set(p) == {"encoder", "decoder", "pre_vq_conv", "post_vq_conv"}
  assert set(p["encoder"]) == {"conv_in", "down_0", "res_0", "down_1", "res_1", "norm_out"}
  assert set(p["decoder"]) == {
    "norm_in",
    "up_0",
    "res_0_0",
    "res_0_1",
    "up_1",
    "res_1_0",
    "res_1_1",
    "conv_out",
  }
  assert set(p["encoder"]["res_0"]) == {"norm1", "conv1", "norm2", "conv2"}
  assert p["encoder"]["down_1"]["kernel"].shape == (4, 4, 4, 8, 16)
  assert p["decoder"]["up_0"]["kernel"].shape == (4, 4, 4, 16, 16)
  assert p["decoder"]["up_1"]["kernel"].shape == (4, 4, 4, 16, 8)
  assert p["decoder"]["conv_out"]["kernel"].shape == (3, 3, 3, 8, 1)
  assert p["pre_vq_conv"]["kernel"].shape == (1, 1, 1, 16, 4)
  assert variables["codebook"]["quantizer"]["embeddings"].shape == (32, 4)


def test_resize_upsampler_layout_and_equal_weight_per_output_voxel():
  cfg = _tiny_config((4, 4, 2))
  cfg.upsampler = "resize"
  model = vqgan.VQGAN.from_config(cfg)
  x = jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
  assert out["recon"].shape == (1, 16, 16, 16, 1)
  assert variables["params"]["decoder"]["up_1"]["kernel"].shape == (3, 3, 3, 16, 8)
  np.testing.assert_array_equal(
    vqgan.nearest_upsample(jnp.arange(4.0).reshape(1, 2, 2, 1, 1), (2, 1, 3))[0, :, :, :, 0],
    np.repeat(np.repeat(np.arange(4.0).reshape(2, 2, 1), 2, 0), 3, 2),
  )
  cfg.upsampler = "pixelshuffle"
  with pytest.raises(ValueError, match="model.upsampler"):
    jax.eval_shape(vqgan.VQGAN.from_config(cfg).init, jax.random.key(0), x)


def test_anisotropic_downsampling_shapes():
  out, _ = _shapes((4, 4, 2), (1, 16, 16, 8, 1))
  assert out["latent"].shape == (1, 4, 4, 4, 4)
  assert out["recon"].shape == (1, 16, 16, 8, 1)


def test_forward_and_methods_agree(tiny):
  model, variables, x = tiny

  @jax.jit
  def run(variables):
    out = model.apply(variables, x)
    z = model.apply(variables, x, method=model.encode)
    q = model.apply(variables, z, method=model.quantize)
    recon = model.apply(variables, q["quantized"], method=model.decode)
    codes = model.apply(variables, out["indices"], method=model.lookup)
    return out, z, q, recon, codes

  out, z, q, recon, codes = run(variables)
  assert out["recon"].shape == x.shape
  assert out["latent"].shape == out["quantized"].shape == (2, 8, 8, 8, 4)
  assert out["indices"].shape == (2, 8, 8, 8)
  for key in ("commitment_loss", "perplexity", "live_codes"):
    assert out[key].shape == ()
  np.testing.assert_allclose(z, out["latent"], atol=1e-5)
  np.testing.assert_array_equal(q["indices"], out["indices"])
  np.testing.assert_allclose(recon, out["recon"], atol=1e-5)
  np.testing.assert_allclose(codes, out["quantized"], atol=1e-5)


def test_training_step_straight_through_and_codebook_init(tiny):
  model, variables, x = tiny

  def loss(params, key):
    out, upd = model.apply(
      {**variables, "params": params}, x, train=True, rngs={"codebook": key}, mutable=["codebook"]
    )
    # Reconstruction only: any encoder gradient must pass the straight-through estimator.
    return jnp.mean(jnp.abs(out["recon"] - x)), (out, upd)

  grads, (out, upd) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"], jax.random.key(1))
  enc = jax.tree_util.tree_leaves(grads["encoder"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in enc)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in enc) > 0
  assert float(jnp.sum(jnp.abs(grads["pre_vq_conv"]["kernel"]))) > 0
  assert bool(upd["codebook"]["quantizer"]["initialized"])
  assert int(out["live_codes"]) in range(1, 33)
  assert float(out["perplexity"]) >= 1.0
  assert bool(jnp.all(jnp.isfinite(out["recon"])))


def _l1_and_grads(model, params, codebook, x):
  def loss(p):
    out = model.apply({"params": p, "codebook": codebook}, x)
    return jnp.mean(jnp.abs(out["recon"] - x)), out

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("option", ["remat", "recompute_norms"])
def test_remat_keeps_layout_and_gradients(tiny, option):
  model, variables, x = tiny
  remat = model.clone(**{option: True})
  shapes = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)  # same checkpoints
  (l0, _), g0 = _l1_and_grads(model, variables["params"], variables["codebook"], x)
  (l1, _), g1 = _l1_and_grads(remat, variables["params"], variables["codebook"], x)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs(tiny):
  model, variables, x = tiny
  half = model.clone(dtype="bfloat16")
  shapes = jax.eval_shape(half.init, jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(shapes)} <= {
    jnp.dtype(jnp.float32),
    jnp.dtype(bool),
    jnp.dtype(jnp.int32),
  }
  (l0, out0), g0 = _l1_and_grads(model, variables["params"], variables["codebook"], x)
  (l1, out1), g1 = _l1_and_grads(half, variables["params"], variables["codebook"], x)
  assert out1["recon"].dtype == out1["latent"].dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g1))
  # bfloat16 keeps 8 bits of mantissa: outputs agree to about 1%, not to float32 rounding.
  z0, z1 = np.asarray(out0["latent"]), np.asarray(out1["latent"])
  assert np.abs(z1 - z0).max() < 0.05 * np.abs(z0).max()
  assert 0 < np.abs(z1 - z0).max()  # the computation really ran in bfloat16
  np.testing.assert_allclose(float(l1), float(l0), rtol=0.02)

"""The VQ-GAN train/eval steps on a tiny model (16³, 4 base channels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_support import tiny_vqgan_config

from latentfm import losses
from latentfm.nn.layers import use_conv_impl
from latentfm.nn.lpips import LPIPS
from latentfm.nn.vqgan import to_model_range
from latentfm.train import compiler
from latentfm.train.loop import guard_step
from latentfm.train.vqgan_step import create_state, make_eval_step, make_train_step, models


def tiny_config(**loss):
  return tiny_vqgan_config(**loss)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.random((2, 16, 16, 16, 1), dtype=np.float32))}


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_state_layout():
  state = create_state(jax.random.PRNGKey(0), tiny_config())
  assert set(state) == {
    "step",
    "params",
    "codebook",
    "disc_params",
    "disc_stats",
    "g_opt",
    "d_opt",
    "rng",
  }
  assert not bool(state["codebook"]["quantizer"]["initialized"])
  assert set(state["disc_params"]) == {"image", "volume"}


def test_warmup_step_trains_autoencoder_only(batch):
  config = tiny_config(adaptive_weight=True)  # `default`: the adaptive weight is not needed yet
  state = create_state(jax.random.PRNGKey(0), config)
  step = compiler.jit(guard_step(make_train_step(config, use_gan=False), "stop"))  # as trained
  new, metrics = step(state, batch, None)
  assert int(new["step"]) == 1
  assert bool(new["codebook"]["quantizer"]["initialized"])
  assert not _leaves_equal(new["params"], state["params"])
  assert _leaves_equal(new["disc_params"], state["disc_params"])
  assert metrics["g_image"] == 0 and metrics["feature_matching"] == 0
  losses = [float(metrics["loss"])]
  for _ in range(5):
    new, metrics = step(new, batch, None)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  # Retrace guard: new states and the same batch shape reuse the one compiled step.
  assert step._cache_size() == 1  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def gan_step(batch):
  """(config, state before, state after, metrics) of one adaptive GAN step."""
  config = tiny_config(adaptive_weight=True, discriminator_start=0)
  state = create_state(jax.random.PRNGKey(0), config)
  for disc in state["disc_params"].values():  # logits well away from 0: real and fake differ
    disc["conv_out"]["kernel"] = disc["conv_out"]["kernel"] * 30.0
  new, metrics = jax.jit(make_train_step(config, use_gan=True))(state, batch, None)
  return config, state, new, metrics


def test_gan_step_updates_discriminators(gan_step):
  _, state, new, metrics = gan_step  # the adaptive path exercises all of the plain GAN path
  assert not _leaves_equal(new["disc_params"], state["disc_params"])
  assert not _leaves_equal(new["disc_stats"], state["disc_stats"])
  assert np.isfinite(float(metrics["d_loss"])) and float(metrics["feature_matching"]) > 0
  weight = float(metrics["gan_weight"])
  assert weight > 0 and np.isfinite(weight) and weight != 1.0


def _written_out(config, state, batch):
  """The GAN step's discriminator losses and adaptive weight recomputed from their definitions:
  the step's own inputs (x, its slices, the reconstruction with the step's codebook key), the
  discriminators' logits on them, `hinge_d_loss(real, fake)`, and λ from `jax.grad` with respect
  to the decoder's last kernel. Each also in the wrong order, to show the test can tell."""
  cfg = config.loss
  assert cfg.gan_loss == "hinge" and cfg.perceptual_weight == 0
  model, image_disc, volume_disc = models(config)
  x = to_model_range(batch["image"])
  k_code, k_slice = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))

  def forward(kernel):
    params = losses.replace_last_layer(state["params"], kernel)
    out, _ = model.apply(
      {"params": params, "codebook": state["codebook"]},
      x,
      train=True,
      mutable=["codebook"],
      rngs={"codebook": k_code},
    )
    return out["recon"]

  def logits(name, module, inputs):
    variables = {"params": state["disc_params"][name], "batch_stats": state["disc_stats"][name]}
    return module.apply(variables, inputs, train=True, mutable=["batch_stats"])[0][0]

  kernel = losses.last_layer(state["params"])
  recon = forward(kernel)
  xs, rs = losses.random_slices(k_slice, x, recon)
  ri, fi = logits("image", image_disc, xs), logits("image", image_disc, rs)
  rv, fv = logits("volume", volume_disc, x), logits("volume", volume_disc, recon)

  def gan(recon):
    fake_slices = losses.random_slices(k_slice, x, recon)[1]
    return cfg.image_gan_weight * losses.hinge_g_loss(
      logits("image", image_disc, fake_slices)
    ) + cfg.volume_gan_weight * losses.hinge_g_loss(logits("volume", volume_disc, recon))

  g_rec = jnp.linalg.norm(jax.grad(lambda k: cfg.l1_weight * losses.l1_loss(x, forward(k)))(kernel))
  g_gan = jnp.linalg.norm(jax.grad(lambda k: gan(forward(k)))(kernel))
  return {
    "d_image": (losses.hinge_d_loss(ri, fi), losses.hinge_d_loss(fi, ri)),
    "d_volume": (losses.hinge_d_loss(rv, fv), losses.hinge_d_loss(fv, rv)),
    "gan_weight": (g_rec / (g_gan + 1e-6), g_gan / (g_rec + 1e-6)),
  }


@pytest.mark.parametrize("term", ["d_image", "d_volume", "gan_weight"])
def test_gan_step_terms_match_their_definitions(gan_step, batch, term):
  """d_image / d_volume are `hinge_d_loss(real, fake)` on the discriminators' own logits, and
  the adaptive weight is ‖∇ rec‖ / ‖∇ GAN‖ on the decoder's last kernel (factor 1 here)."""
  config, state, _, metrics = gan_step
  want, wrong_order = (float(v) for v in _written_out_jit(config, state, batch)[term])
  np.testing.assert_allclose(float(metrics[term]), want, rtol=1e-5)
  assert abs(wrong_order - want) > 100 * 1e-5 * abs(want)  # the order shows at this tolerance


_WRITTEN_OUT = {}


def _written_out_jit(config, state, batch):
  """`_written_out`, computed once per module (one compile)."""
  if not _WRITTEN_OUT:
    _WRITTEN_OUT.update(jax.jit(lambda s, b: _written_out(config, s, b))(state, batch))
  return _WRITTEN_OUT


def test_bfloat16_remat_step_keeps_float32_state(batch):
  # The discriminators' bfloat16 path is tested in test_discriminators.py.
  config = tiny_config()
  config.model.dtype, config.model.remat = "bfloat16", True
  state = create_state(jax.random.PRNGKey(0), config)
  new, metrics = jax.jit(make_train_step(config, use_gan=False))(state, batch, None)
  floats = lambda tree: {
    a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)
  }
  assert floats(new) == floats(state) == {jnp.dtype(jnp.float32)}
  assert not _leaves_equal(new["params"], state["params"])
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_gradient_accumulation_applies_every_k(batch):
  config = tiny_config()
  config.optim.accumulate = 2
  state = create_state(jax.random.PRNGKey(0), config)
  step = jax.jit(make_train_step(config, use_gan=False))
  one, _ = step(state, batch, None)
  assert _leaves_equal(one["params"], state["params"])  # first micro-step: no update yet
  two, _ = step(one, batch, None)
  assert not _leaves_equal(two["params"], state["params"])


def test_eval_step_metrics(batch):
  config = tiny_config()
  state = create_state(jax.random.PRNGKey(0), config)
  out = jax.jit(make_eval_step(config))(state, batch["image"])
  assert out["recon"].shape == batch["image"].shape
  assert out["psnr"].shape == (2,) and out["ssim"].shape == (2,)
  assert 0.0 <= float(out["recon"].min()) and float(out["recon"].max()) <= 1.0


def test_codebook_survives_checkpoint_round_trip(batch, tmp_path):
  from latentfm.train import checkpoint

  config = tiny_config()
  state = create_state(jax.random.PRNGKey(0), config)
  trained, _ = jax.jit(make_train_step(config, use_gan=False))(state, batch, None)
  manager = checkpoint.open_manager(str(tmp_path / "ckpt"))
  checkpoint.save(manager, 1, trained, force=True)
  checkpoint.wait(manager)
  fresh = create_state(jax.random.PRNGKey(1), config)  # what a resumed run builds first
  restored, _, _ = checkpoint.restore(manager, fresh)
  checkpoint.close(manager)
  cb, rb = trained["codebook"]["quantizer"], restored["codebook"]["quantizer"]
  assert bool(rb["initialized"])
  for name in ("embeddings", "cluster_size", "embed_sum"):
    np.testing.assert_array_equal(np.asarray(rb[name]), np.asarray(cb[name]))
  assert _leaves_equal(restored, trained)


@pytest.mark.parametrize("impl", ["lax", "auto"])
def test_config_conv_impl_reaches_every_convolution(impl, batch):
  """`model.conv_impl` decides the autoencoder's, both discriminators' and LPIPS' convolutions:
  "lax" leaves none of the CPU formulations' custom VJPs in the step, "auto" (the CPU's) does."""
  config = tiny_config(perceptual_weight=1.0, discriminator_start=0)
  config.model.conv_impl = impl
  state = jax.eval_shape(lambda: create_state(jax.random.PRNGKey(0), config))
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  lpips_params = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), image, image)
  with use_conv_impl("fast"):  # what "auto" means here; an explicit "lax" must win over it
    text = str(jax.make_jaxpr(make_train_step(config, use_gan=True))(state, batch, lpips_params))
  assert ("custom_vjp" in text) == (impl == "auto")

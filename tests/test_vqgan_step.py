"""The VQ-GAN train/eval steps on a tiny model (16³, 4 base channels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vqgan_config
from latentfm.nn.layers import use_conv_impl
from latentfm.nn.lpips import LPIPS
from latentfm.train.vqgan_step import create_state, make_eval_step, make_train_step


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
  assert set(state) == {"step", "params", "codebook", "disc_params", "disc_stats", "g_opt",
                        "d_opt", "rng"}
  assert not bool(state["codebook"]["quantizer"]["initialized"])
  assert set(state["disc_params"]) == {"image", "volume"}


def test_warmup_step_trains_autoencoder_only(batch):
  config = tiny_config(adaptive_weight=True)  # `default`: the adaptive weight is not needed yet
  state = create_state(jax.random.PRNGKey(0), config)
  step = jax.jit(make_train_step(config, use_gan=False))
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


def test_gan_step_updates_discriminators(batch):
  adaptive = True  # the adaptive path exercises everything the plain GAN path does, and more
  config = tiny_config(adaptive_weight=adaptive, discriminator_start=0)
  state = create_state(jax.random.PRNGKey(0), config)
  new, metrics = jax.jit(make_train_step(config, use_gan=True))(state, batch, None)
  assert not _leaves_equal(new["disc_params"], state["disc_params"])
  assert not _leaves_equal(new["disc_stats"], state["disc_stats"])
  assert np.isfinite(float(metrics["d_loss"])) and float(metrics["feature_matching"]) > 0
  weight = float(metrics["gan_weight"])
  assert weight > 0 and np.isfinite(weight) and weight != 1.0


def test_bfloat16_remat_step_keeps_float32_state(batch):
  # The discriminators' bfloat16 path is tested in test_discriminators.py.
  config = tiny_config()
  config.model.dtype, config.model.remat = "bfloat16", True
  state = create_state(jax.random.PRNGKey(0), config)
  new, metrics = jax.jit(make_train_step(config, use_gan=False))(state, batch, None)
  floats = lambda tree: {a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype,
                                                                                  jnp.floating)}
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

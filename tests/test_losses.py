"""Tests for the VQ-GAN losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.vqgan import get_config
from latentfm import losses
from latentfm.nn import vqgan

LN2, LN3 = np.log(2.0), np.log(3.0)


def _fake_lpips(xs, ys):
  """Stand-in for LPIPS: mean squared difference per image, shape (B,)."""
  return jnp.mean((xs - ys) ** 2, axis=(1, 2, 3))


def _cfg(**overrides):
  c = get_config("thesis").loss
  c.l1_weight, c.commitment_weight, c.perceptual_weight = 2.0, 0.25, 3.0
  c.gan_feat_weight, c.image_gan_weight, c.volume_gan_weight = 5.0, 0.5, 1.5
  c.discriminator_start = 10
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_l1_exact():
  x = jnp.array([[1.0, -2.0], [0.5, 4.0]])
  y = jnp.array([[0.0, 1.0], [0.5, 2.0]])
  assert float(losses.l1_loss(x, y)) == pytest.approx((1 + 3 + 0 + 2) / 4)


def test_gan_losses_hand_computed():
  real = jnp.array([[1.5, 0.5], [-1.0, 0.0]])  # relu(1 - real) = 0, .5, 2, 1
  fake = jnp.array([[-2.0, -0.5], [0.5, 1.0]])  # relu(1 + fake) = 0, .5, 1.5, 2
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.875 + 1.0))
  assert float(losses.d_loss("hinge", real, fake)) == pytest.approx(0.9375)
  assert float(losses.hinge_g_loss(fake)) == pytest.approx(0.25)
  assert float(losses.g_loss("hinge", fake)) == pytest.approx(0.25)
  real = jnp.array([0.0, LN3])  # softplus(-real) = ln 2, ln 4/3
  fake = jnp.array([0.0, -LN3])  # softplus(fake) = ln 2, ln 4/3; softplus(-fake) = ln 2, ln 4
  want_d = 0.5 * np.log(8 / 3)
  assert float(losses.vanilla_d_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
  assert float(losses.d_loss("vanilla", real, fake)) == pytest.approx(want_d, rel=1e-6)
  assert float(losses.vanilla_g_loss(fake)) == pytest.approx(1.5 * LN2, rel=1e-6)
  assert float(losses.g_loss("vanilla", fake)) == pytest.approx(1.5 * LN2, rel=1e-6)


def test_unknown_gan_kind_raises():
  z = jnp.zeros((2,))
  with pytest.raises(ValueError, match="unknown GAN loss"):
    losses.d_loss("wgan", z, z)
  with pytest.raises(ValueError, match="unknown GAN loss"):
    losses.g_loss("lsgan", z)
  with pytest.raises(ValueError, match="unknown GAN loss"):
    losses.vqgan_discriminator_loss(z, z, z, z, _cfg(gan_loss="wgan"), 0)


def test_feature_matching_value_and_stop_gradient():
  fake = [jnp.ones((2, 3)), jnp.full((2, 2, 2), 5.0)]
  real = [jnp.zeros((2, 3)), jnp.full((2, 2, 2), 2.0)]
  assert float(losses.feature_matching_loss(fake, real)) == pytest.approx(2 * 1 + 2 * 3)
  g_fake, g_real = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(fake, real)
  for g in g_real:
    assert not np.any(np.asarray(g))
  np.testing.assert_allclose(g_fake[0], np.full((2, 3), 2 / 6))
  np.testing.assert_allclose(g_fake[1], np.full((2, 2, 2), 2 / 8))
  with pytest.raises(ValueError):
    losses.feature_matching_loss(fake, real[:1])


def test_random_slices_match_numpy_indexing():
  b, d = 4, 7
  x = np.random.default_rng(0).normal(size=(b, d, 5, 6, 1)).astype(np.float32)
  y = x * 2.0 + 1.0
  # Channel 0 of `tag` encodes the depth index, so each slice tells which index it came from.
  tag = np.broadcast_to(np.arange(d, dtype=np.float32)[None, :, None, None, None], x.shape)
  distinct = False
  for seed in range(5):
    key = jax.random.key(seed)
    xs, ys = losses.random_slices(key, jnp.asarray(x), jnp.asarray(y))
    ts, _ = losses.random_slices(key, jnp.asarray(tag), jnp.asarray(tag))
    assert xs.shape == ys.shape == (b, 5, 6, 1)
    idx = np.asarray(ts[:, 0, 0, 0]).astype(int)
    np.testing.assert_array_equal(xs, x[np.arange(b), idx])
    np.testing.assert_array_equal(ys, y[np.arange(b), idx])  # same index for x and y
    distinct |= len(set(idx.tolist())) > 1
  assert distinct
  with pytest.raises(ValueError):
    losses.random_slices(jax.random.key(0), jnp.asarray(x), jnp.asarray(x[:, :3]))


def test_perceptual_loss_uses_shared_slices():
  key = jax.random.key(3)
  x = jax.random.normal(jax.random.key(1), (3, 4, 6, 6, 1))
  y = jax.random.normal(jax.random.key(2), (3, 4, 6, 6, 1))
  xs, ys = losses.random_slices(key, x, y)
  want = np.mean((np.asarray(xs) - np.asarray(ys)) ** 2)
  got = losses.perceptual_loss(_fake_lpips, key, x, y)
  assert float(got) == pytest.approx(want, rel=1e-6)


def test_gan_factor_switches_at_start():
  assert [float(losses.gan_factor(s, 10)) for s in (0, 9, 10, 11)] == [0.0, 0.0, 1.0, 1.0]
  jitted = jax.jit(losses.gan_factor, static_argnums=1)
  assert [float(jitted(jnp.int32(s), 10)) for s in (9, 10)] == [0.0, 1.0]
  both_traced = jax.jit(losses.gan_factor)
  assert [float(both_traced(s, 10)) for s in (9, 10)] == [0.0, 1.0]
  assert losses.gan_factor(jnp.int32(3), 10).dtype == jnp.float32


def _toy_problem():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(12, 3)).astype(np.float32)  # features entering the last layer
  x = rng.normal(size=(12, 1)).astype(np.float32)  # target
  a = rng.normal(size=(12, 1)).astype(np.float32)  # linear "discriminator": logits = a * recon
  params = {
    "decoder": {
      "conv_out": {"kernel": rng.normal(size=(3, 1)).astype(np.float32)},
      "other": {"kernel": np.ones((2,), np.float32)},
    }
  }
  return h, x, a, params


def test_adaptive_weight_matches_numpy_norm_ratio():
  h, x, a, params = _toy_problem()
  w = params["decoder"]["conv_out"]["kernel"]
  recon = h @ w
  rec_grad_np = h.T @ np.sign(recon - x) / recon.size  # d/dW mean|hW - x|
  gan_grad_np = -h.T @ a / recon.size  # d/dW -mean(a * hW)
  want = np.linalg.norm(rec_grad_np) / (np.linalg.norm(gan_grad_np) + 1e-6)

  def forward(k):
    r = jnp.asarray(h) @ k
    return r, {"mean": jnp.mean(r)}

  kernel = losses.last_layer(params)
  recon_j, aux, rec_grad, gan_grad = losses.last_layer_grads(
    forward, kernel, lambda r: losses.l1_loss(r, x), lambda r: losses.hinge_g_loss(a * r)
  )
  np.testing.assert_allclose(recon_j, recon, rtol=1e-6)
  assert float(aux["mean"]) == pytest.approx(float(recon.mean()), rel=1e-5)
  np.testing.assert_allclose(rec_grad, rec_grad_np, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gan_grad, gan_grad_np, rtol=1e-5, atol=1e-7)
  lam = losses.adaptive_weight(rec_grad, gan_grad)
  assert float(lam) == pytest.approx(want, rel=1e-5)
  # Clipping and stop-gradient.
  assert float(losses.adaptive_weight(rec_grad, jnp.zeros_like(gan_grad), 7.0)) == 7.0
  assert float(jax.grad(lambda g: losses.adaptive_weight(g, gan_grad))(rec_grad).sum()) == 0.0


def test_last_layer_grads_keep_outer_gradient():
  """Computing λ inside the loss leaves the outer gradient that of a constant λ."""
  h, x, a, params = _toy_problem()

  def forward_of(p):
    def forward(k):
      q = losses.replace_last_layer(p, k)
      scale = q["decoder"]["other"]["kernel"].sum()
      return (jnp.asarray(h) @ q["decoder"]["conv_out"]["kernel"]) * scale, None

    return forward

  def total(recon, lam):
    return losses.l1_loss(recon, x) + lam * losses.hinge_g_loss(a * recon)

  def loss_with_lambda(p):
    recon, _, g_rec, g_gan = losses.last_layer_grads(
      forward_of(p),
      losses.last_layer(p),
      lambda r: losses.l1_loss(r, x),
      lambda r: losses.hinge_g_loss(a * r),
    )
    lam = losses.adaptive_weight(g_rec, g_gan)
    return total(recon, lam), lam

  (_, lam), g = jax.jit(jax.value_and_grad(loss_with_lambda, has_aux=True))(params)
  g_ref = jax.grad(lambda p: total(forward_of(p)(losses.last_layer(p))[0], lam))(params)
  for got, want in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(g["decoder"]["conv_out"]["kernel"]))
  assert np.any(np.asarray(g["decoder"]["other"]["kernel"]))


def test_last_layer_path_matches_vqgan_params():
  model = vqgan.VQGAN(n_hiddens=4, downsample=(2, 2, 2), embedding_dim=4, n_codes=8)
  x = jax.ShapeDtypeStruct((1, 8, 8, 8, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert losses.last_layer(params).shape == (3, 3, 3, 8, 1)
  new = losses.replace_last_layer(params, 0)
  assert losses.last_layer(new) == 0 and losses.last_layer(params) is not None
  assert new["encoder"] is params["encoder"]


def _disc_output(key, n_features):
  feats = [jax.random.normal(jax.random.fold_in(key, i), (2, 4, i + 2)) for i in range(n_features)]
  return jax.random.normal(key, (2, 3, 3, 1)), feats


def _gen_inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (2, 4, 6, 6, 1))
  recon = jax.random.normal(ks[1], (2, 4, 6, 6, 1))
  disc = _disc_output
  return dict(
    x=x,
    recon=recon,
    commitment=jnp.float32(0.7),
    perceptual=jnp.float32(0.3),
    fake_image=disc(ks[2], 3),
    real_image=disc(ks[3], 3),
    fake_volume=disc(ks[4], 4),
    real_volume=disc(ks[5], 4),
  )


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_generator_loss_is_weighted_sum(kind):
  inp, c = _gen_inputs(), _cfg(gan_loss=kind, adaptive_weight=True)
  total, t = losses.vqgan_generator_loss(
    **inp, config=c, step=jnp.int32(10), adaptive=jnp.float32(2.5)
  )
  fm = losses.feature_matching_loss(
    inp["fake_image"][1], inp["real_image"][1]
  ) + losses.feature_matching_loss(inp["fake_volume"][1], inp["real_volume"][1])
  gi, gv = (losses.g_loss(kind, inp[k][0]) for k in ("fake_image", "fake_volume"))
  assert float(t["l1"]) == pytest.approx(float(losses.l1_loss(inp["x"], inp["recon"])))
  assert float(t["g_image"]) == pytest.approx(float(gi))
  assert float(t["g_volume"]) == pytest.approx(float(gv))
  assert float(t["feature_matching"]) == pytest.approx(float(fm), rel=1e-6)
  assert float(t["gan_weight"]) == 2.5
  want = 2.0 * t["l1"] + 0.25 * 0.7 + 3.0 * 0.3 + 2.5 * (0.5 * gi + 1.5 * gv) + 5.0 * fm
  assert float(total) == pytest.approx(float(want), rel=1e-6)
  assert float(t["loss"]) == float(total)
  assert set(t) == {
    "l1",
    "commitment",
    "perceptual",
    "g_image",
    "g_volume",
    "feature_matching",
    "gan_weight",
    "loss",
  }
  # Without the adaptive weight λ = 1 and any passed value is ignored.
  c.adaptive_weight = False
  _, t1 = losses.vqgan_generator_loss(**inp, config=c, step=10, adaptive=jnp.float32(9.0))
  assert float(t1["gan_weight"]) == 1.0


def test_generator_loss_requires_adaptive_when_configured():
  with pytest.raises(ValueError, match="adaptive"):
    losses.vqgan_generator_loss(**_gen_inputs(), config=_cfg(adaptive_weight=True), step=0)


def test_gan_terms_off_before_discriminator_start():
  inp, c = _gen_inputs(), _cfg()
  diff = ("recon", "fake_image", "fake_volume")

  @jax.jit
  def run(step, args):
    def f(a):
      return losses.vqgan_generator_loss(**{**inp, **a}, config=c, step=step)[0]

    return jax.value_and_grad(f)(args)

  args = {k: inp[k] for k in diff}
  before, g_before = run(jnp.int32(9), args)
  after, g_after = run(jnp.int32(10), args)
  base = 2.0 * losses.l1_loss(inp["x"], inp["recon"]) + 0.25 * 0.7 + 3.0 * 0.3
  assert float(before) == pytest.approx(float(base), rel=1e-6)
  assert float(after) != pytest.approx(float(base), rel=1e-3)
  l1_grad = jax.grad(lambda r: 2.0 * losses.l1_loss(inp["x"], r))(inp["recon"])
  np.testing.assert_allclose(g_before["recon"], l1_grad, rtol=1e-6)
  for name in ("fake_image", "fake_volume"):
    assert not any(np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(g_before[name]))
    assert all(np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(g_after[name]))


def test_discriminator_loss_assembly():
  ks = jax.random.split(jax.random.key(0), 4)
  ri, fi = jax.random.normal(ks[0], (2, 3, 3, 1)), jax.random.normal(ks[1], (2, 3, 3, 1))
  rv, fv = jax.random.normal(ks[2], (2, 2, 3, 3, 1)), jax.random.normal(ks[3], (2, 2, 3, 3, 1))
  c = _cfg()
  before, _ = losses.vqgan_discriminator_loss(ri, fi, rv, fv, c, 9)
  assert float(before) == 0.0
  run = jax.jit(lambda step: losses.vqgan_discriminator_loss(ri, fi, rv, fv, c, step))
  total, t = run(jnp.int32(10))
  want = 0.5 * losses.hinge_d_loss(ri, fi) + 1.5 * losses.hinge_d_loss(rv, fv)
  assert float(total) == pytest.approx(float(want), rel=1e-6)
  assert float(t["d_loss"]) == float(total)
  assert float(t["fake_volume_logit"]) == pytest.approx(float(fv.mean()), abs=1e-6)
  assert set(t) == {
    "d_image",
    "d_volume",
    "d_loss",
    "real_image_logit",
    "fake_image_logit",
    "real_volume_logit",
    "fake_volume_logit",
  }

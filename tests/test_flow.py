"""Tests for flow-matching paths, time sampling, losses and latent normalisation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import normal as _normal

from latentfm import flow


def test_interpolation_endpoints_and_per_example_time():
  z0, z1 = _normal((3, 2, 2, 2, 2), 0), _normal((3, 2, 2, 2, 2), 1)
  np.testing.assert_allclose(flow.interpolate(z0, z1, 0.0), z0)
  np.testing.assert_allclose(flow.interpolate(z0, z1, 1.0), z1)
  zt = flow.interpolate(z0, z1, jnp.array([0.0, 0.25, 1.0]))
  np.testing.assert_allclose(zt[0], z0[0])
  np.testing.assert_allclose(zt[1], 0.75 * z0[1] + 0.25 * z1[1], rtol=1e-6)
  np.testing.assert_allclose(zt[2], z1[2])
  np.testing.assert_allclose(flow.target_velocity(z0, z1), z1 - z0)


def test_loss_kinds_hand_checked():
  pred, target = jnp.array([1.0, -2.0, 0.5, 0.0]), jnp.zeros(4)
  assert float(flow.fm_loss(pred, target, "l2")) == pytest.approx((1 + 4 + 0.25) / 4)
  assert float(flow.fm_loss(pred, target, "l1")) == pytest.approx(3.5 / 4)
  assert float(flow.fm_loss(pred, target, "hybrid")) == pytest.approx(0.9 * 0.875 + 0.1 * 1.3125)
  with pytest.raises(ValueError, match="l2"):
    flow.fm_loss(pred, target, "l3")


def _exact_field(variables, z, t, train, rngs):
  """Exact velocity field of the one-point data set {c}: (z_t - c) / t = z1 - c."""
  assert train and "dropout" in rngs
  return (z - variables["params"]["c"]) / t[:, None, None, None, None]


@pytest.mark.parametrize("sampling", flow.TIME_SAMPLINGS)
def test_loss_vanishes_for_exact_field(sampling):
  c = _normal((4, 4, 4, 3), 2, scale=0.5)
  z0 = jnp.broadcast_to(c, (4, *c.shape))
  for kind in flow.LOSS_KINDS:
    cfg = {
      "loss": kind,
      "time_sampling": sampling,
      "logit_normal_mean": 0.0,
      "logit_normal_std": 1.0,
    }
    loss_fn = jax.jit(flow.make_fm_loss_fn(_exact_field, cfg))
    loss, metrics = loss_fn({"c": c}, z0, jax.random.key(0))
    assert float(loss) < 1e-4 and float(metrics["l2"]) < 1e-8, kind
    wrong, _ = loss_fn({"c": c + 0.5}, z0, jax.random.key(0))
    assert float(wrong) > 0.1, kind


def test_loss_factory_rejects_unknown_settings():
  with pytest.raises(ValueError, match="loss"):
    flow.make_fm_loss_fn(_exact_field, {"loss": "huber", "time_sampling": "uniform"})
  with pytest.raises(ValueError, match="time sampling"):
    flow.make_fm_loss_fn(_exact_field, {"loss": "l1", "time_sampling": "beta"})


def test_time_sampling():
  u = flow.sample_time(jax.random.key(0), 20_000)
  assert u.shape == (20_000,) and float(u.min()) >= 0 and float(u.max()) < 1
  assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
  t = flow.sample_time(jax.random.key(1), 20_000, "logit_normal", mean=0.5, std=1.5)
  assert float(t.min()) > 0 and float(t.max()) < 1
  assert float(jnp.median(t)) == pytest.approx(float(jax.nn.sigmoid(0.5)), abs=0.01)
  # logit(t) is N(0.5, 1.5^2).
  assert float(jnp.std(jnp.log(t / (1 - t)))) == pytest.approx(1.5, rel=0.03)


def test_normalisation_round_trip():
  z = _normal((6, 4, 4, 4, 3), 3) * jnp.array([0.5, 2.0, 4.0]) + jnp.array([-1.0, 0.0, 3.0])
  stats = flow.compute_latent_stats(z)
  np.testing.assert_allclose(stats.mean, z.mean(axis=(0, 1, 2, 3)), atol=1e-5)
  n = flow.normalize(z, stats)
  np.testing.assert_allclose(n.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(n.std(axis=(0, 1, 2, 3)), 1.0, atol=1e-5)
  np.testing.assert_allclose(flow.denormalize(n, stats), z, atol=1e-5)
  # A pytree: usable as a jit argument.
  np.testing.assert_allclose(jax.jit(flow.normalize)(z, stats), n, atol=1e-6)


def test_constant_channel_does_not_divide_by_zero():
  z = jnp.ones((2, 2, 2, 2, 1))
  assert bool(jnp.isfinite(flow.normalize(z, flow.compute_latent_stats(z))).all())


def test_stats_json_round_trip():
  stats = flow.compute_latent_stats(_normal((2, 3, 3, 3, 4), 4, loc=1.0, scale=3.0))
  text = json.dumps(stats.to_dict())
  back = flow.LatentStats.from_dict(json.loads(text))
  np.testing.assert_array_equal(back.mean, stats.mean)
  np.testing.assert_array_equal(back.std, stats.std)
  back = flow.LatentStats.from_json(stats.to_json())
  np.testing.assert_array_equal(back.std, stats.std)

"""Tests for the EMA vector quantiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from latentfm.nn.quantizer import VectorQuantizer

D = 4


def _data(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _state(embeddings, cluster_size=None, embed_sum=None, initialized=True):
  e = jnp.asarray(embeddings, jnp.float32)
  cs = jnp.ones(e.shape[0]) if cluster_size is None else jnp.asarray(cluster_size, jnp.float32)
  es = e * cs[:, None] if embed_sum is None else jnp.asarray(embed_sum, jnp.float32)
  return {
    "codebook": {
      "embeddings": e,
      "cluster_size": cs,
      "embed_sum": es,
      "initialized": jnp.array(initialized),
    }
  }


@functools.lru_cache(maxsize=None)
def _train_fn(k, decay=0.99, restart=True):
  vq = VectorQuantizer(k, D, decay=decay, restart_dead_codes=restart)

  @jax.jit
  def step(variables, z, seed):
    return vq.apply(
      variables, z, train=True, rngs={"codebook": jax.random.key(seed)}, mutable=["codebook"]
    )

  return step


def _numpy_ema(state, z, decay, eps=1e-5):
  emb = np.asarray(state["embeddings"], np.float64)
  flat = np.asarray(z, np.float64).reshape(-1, D)
  idx = np.argmin(((flat[:, None] - emb[None]) ** 2).sum(-1), axis=1)
  k = emb.shape[0]
  counts = np.bincount(idx, minlength=k)
  sums = np.zeros_like(emb)
  np.add.at(sums, idx, flat)
  cs = decay * np.asarray(state["cluster_size"]) + (1 - decay) * counts
  es = decay * np.asarray(state["embed_sum"]) + (1 - decay) * sums
  n = cs.sum()
  smoothed = (cs + eps) / (n + k * eps) * n
  return idx, cs, es, es / smoothed[:, None]


def _min_dist_to_rows(codes, rows):
  codes, rows = np.asarray(codes), np.asarray(rows).reshape(-1, D)
  return np.sqrt(((codes[:, None] - rows[None]) ** 2).sum(-1)).min(axis=1)


def test_no_trainable_params_and_state_layout():
  variables = VectorQuantizer(16, D).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2, D)))
  assert set(variables) == {"codebook"}
  cb = variables["codebook"]
  assert cb["embeddings"].shape == (16, D) and cb["embed_sum"].shape == (16, D)
  assert cb["cluster_size"].shape == (16,)
  assert not bool(cb["initialized"])


def test_nearest_code_and_outputs_in_eval_mode():
  vq = VectorQuantizer(16, D)
  variables = _state(_data((16, D), 0))
  z = _data((2, 3, 3, 3, D), 1)
  out = vq.apply(variables, z)
  emb = np.asarray(variables["codebook"]["embeddings"])
  d2 = ((np.asarray(z).reshape(-1, D)[:, None] - emb[None]) ** 2).sum(-1)
  chosen = d2[np.arange(d2.shape[0]), np.asarray(out["indices"]).reshape(-1)]
  np.testing.assert_allclose(chosen, d2.min(axis=1), atol=1e-5)
  assert out["indices"].shape == (2, 3, 3, 3)
  codes = emb[np.asarray(out["indices"])]
  np.testing.assert_allclose(out["quantized"], codes, atol=1e-6)
  np.testing.assert_allclose(
    out["commitment_loss"], np.mean((np.asarray(z) - codes) ** 2), rtol=1e-5
  )
  np.testing.assert_array_equal(vq.apply(variables, z, method=vq.nearest), out["indices"])
  np.testing.assert_allclose(vq.apply(variables, z, method=vq.snap), codes, atol=1e-6)
  np.testing.assert_allclose(vq.apply(variables, out["indices"], method=vq.lookup), codes)


def test_straight_through_and_commitment_gradients():
  vq = VectorQuantizer(8, D)
  variables = _state(_data((8, D), 2))
  z = _data((1, 2, 2, 2, D), 3)
  g_st = jax.grad(lambda z: jnp.sum(vq.apply(variables, z)["quantized"] * 3.0))(z)
  np.testing.assert_allclose(g_st, np.full(z.shape, 3.0))
  codes = vq.apply(variables, z, method=vq.snap)
  g_c = jax.grad(lambda z: vq.apply(variables, z)["commitment_loss"])(z)
  np.testing.assert_allclose(g_c, 2 * (z - codes) / z.size, rtol=1e-5, atol=1e-7)


def test_data_initialisation_happens_exactly_once():
  # decay 1 freezes the EMA, so any change after the first call would be a re-initialisation.
  step = _train_fn(16, decay=1.0, restart=False)
  variables = VectorQuantizer(16, D).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2, D)))
  za, zb = _data((2, 3, 3, 3, D), 4), _data((2, 3, 3, 3, D), 5) + 10.0
  _, upd = step(variables, za, 0)
  cb1 = upd["codebook"]
  assert bool(cb1["initialized"])
  np.testing.assert_allclose(cb1["cluster_size"], np.ones(16))
  np.testing.assert_allclose(_min_dist_to_rows(cb1["embeddings"], za), 0.0, atol=1e-5)
  assert len(np.unique(np.asarray(cb1["embeddings"]), axis=0)) == 16  # drawn without replacement
  _, upd2 = step(upd, zb, 1)
  np.testing.assert_allclose(upd2["codebook"]["embeddings"], cb1["embeddings"], atol=1e-6)


def test_initialisation_tiles_small_batches():
  step = _train_fn(16, decay=1.0, restart=False)
  variables = VectorQuantizer(16, D).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2, D)))
  z = _data((1, 2, 2, 2, D), 6)  # 8 vectors for 16 codes
  _, upd = step(variables, z, 0)
  emb = upd["codebook"]["embeddings"]
  assert _min_dist_to_rows(emb, z).max() < 0.1
  assert len(np.unique(np.asarray(emb), axis=0)) == 16


def test_ema_update_matches_numpy_reference():
  step = _train_fn(16, decay=0.99, restart=False)
  variables = VectorQuantizer(16, D).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2, D)))
  _, upd = step(variables, _data((2, 3, 3, 3, D), 7), 0)
  state = jax.tree.map(np.asarray, upd["codebook"])
  z = _data((2, 3, 3, 3, D), 8)
  out, upd2 = step(upd, z, 1)
  idx, cs, es, emb = _numpy_ema(state, z, 0.99)
  np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), idx)
  cb = upd2["codebook"]
  np.testing.assert_allclose(cb["cluster_size"], cs, rtol=1e-5)
  np.testing.assert_allclose(cb["embed_sum"], es, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(cb["embeddings"], emb, rtol=1e-4, atol=1e-5)


def test_dead_code_restart():
  step = _train_fn(8, decay=0.99, restart=True)
  codes = np.eye(8, D) * 3.0
  codes[4:] = -3.0 + np.arange(4)[:, None]
  codes[7] = 100.0  # far from all data: never assigned
  cluster_size = np.full(8, 5.0)
  cluster_size[7] = 0.5
  variables = _state(codes, cluster_size)
  z = _data((2, 3, 3, 3, D), 9)
  _, upd = step(variables, z, 3)
  cb = jax.tree.map(np.asarray, upd["codebook"])
  assert _min_dist_to_rows(cb["embeddings"][7:], z)[0] < 1e-5
  assert cb["cluster_size"][7] == 1.0
  np.testing.assert_allclose(cb["embed_sum"][7], cb["embeddings"][7])
  _, cs, es, emb = _numpy_ema(jax.tree.map(np.asarray, variables["codebook"]), z, 0.99)
  np.testing.assert_allclose(cb["cluster_size"][:7], cs[:7], rtol=1e-5)
  np.testing.assert_allclose(cb["embeddings"][:7], emb[:7], rtol=1e-4, atol=1e-5)


def test_perplexity_and_live_codes_of_uniform_usage():
  vq = VectorQuantizer(8, D)
  codes = np.eye(8, D) * np.arange(1, 9)[:, None]
  variables = _state(codes)
  z = jnp.asarray(np.repeat(codes[:4], 2, axis=0).reshape(1, 2, 2, 2, D), jnp.float32)
  out = vq.apply(variables, z)
  np.testing.assert_allclose(out["perplexity"], 4.0, rtol=1e-5)
  assert int(out["live_codes"]) == 4


def test_eval_and_immutable_calls_leave_codebook_alone():
  vq = VectorQuantizer(8, D)
  variables = _state(_data((8, D), 10))
  z = _data((1, 2, 2, 2, D), 11)
  _, upd = vq.apply(variables, z, train=False, mutable=["codebook"])
  np.testing.assert_array_equal(upd["codebook"]["embeddings"], variables["codebook"]["embeddings"])
  vq.apply(variables, z, train=True)  # collection not mutable: no update, no rng needed


def test_nearest_code_is_the_brute_force_argmin():
  from latentfm.nn.quantizer import nearest_code  # pylint: disable=import-outside-toplevel

  flat, codes = np.asarray(_data((200, D), 0)), np.asarray(_data((64, D), 1)) * 2.0
  brute = np.argmin(((flat[:, None, :] - codes[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(nearest_code(jnp.asarray(flat), jnp.asarray(codes)), brute)

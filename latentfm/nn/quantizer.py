"""EMA vector quantiser with data initialisation and dead-code restarts.

The codebook is not trained by gradients: it lives in the mutable collection `"codebook"`
(nothing in `"params"`), so it is part of the checkpointed train state, including the flag that
says whether it has been initialised from data.

Variables (collection `"codebook"`):
  embeddings   (K, D)  the codes used for the nearest-neighbour lookup
  cluster_size (K,)    EMA of the number of vectors assigned to each code
  embed_sum    (K, D)  EMA of the sum of the vectors assigned to each code
  initialized  ()      bool, set by the first training call

A training call (`train=True`, collection mutable, rng stream `"codebook"`):
  1. if not initialised: embeddings = embed_sum = K random encoder vectors of the batch,
     cluster_size = 1;
  2. assigns every vector to its nearest code (squared L2) with the current codebook;
  3. EMA: cluster_size <- decay * cluster_size + (1 - decay) * counts,
     embed_sum <- decay * embed_sum + (1 - decay) * sums, and
     embeddings = embed_sum / laplace(cluster_size), with
     laplace(c) = (c + eps) / (n + K * eps) * n, n = sum(c);
  4. dead codes (cluster_size < 1 after the EMA) are restarted from random batch vectors: for
     such a code embeddings = embed_sum = the vector and cluster_size = 1, so the code state stays
     self-consistent (embed_sum / cluster_size is the new code) and a restarted code that again
     catches no vector decays below 1 and is redrawn at the next step.
Random batch vectors are drawn without replacement; when the batch has fewer vectors than codes
it is tiled and jittered by N(0, (0.01 / sqrt(D))^2) so that repeated vectors give distinct codes.
Batch statistics are over the whole (global) batch seen by `jit`.
"""

import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


def sample_vectors(key: Array, flat: Array, num: int) -> Array:
  """Draws `num` rows of `flat` (M, D) at random, tiling with small jitter if M < num."""
  m, d = flat.shape
  if m >= num:
    return flat[jax.random.permutation(key, m)[:num]]
  reps = -(-num // m)
  k_perm, k_noise = jax.random.split(key)
  idx = jax.random.permutation(k_perm, m * reps)[:num] % m
  noise = jax.random.normal(k_noise, (num, d), flat.dtype) * (0.01 / math.sqrt(d))
  return flat[idx] + noise


def nearest_code(flat: Array, embeddings: Array) -> Array:
  """Index of the nearest code (squared L2) for each row of `flat` (M, D)."""
  cross = jnp.dot(flat, embeddings.T, precision=lax.Precision.HIGHEST)
  dist = jnp.sum(flat**2, -1, keepdims=True) - 2.0 * cross + jnp.sum(embeddings**2, -1)[None, :]
  return jnp.argmin(dist, axis=-1)


class VectorQuantizer(nn.Module):
  """Nearest-code quantiser of the last axis with an EMA-updated codebook."""

  n_codes: int
  embedding_dim: int
  decay: float = 0.99
  restart_dead_codes: bool = True
  eps: float = 1e-5

  def setup(self):
    k, d = self.n_codes, self.embedding_dim
    self.embeddings = self.variable(
      "codebook",
      "embeddings",
      lambda: jax.random.normal(self.make_rng("params"), (k, d), jnp.float32),
    )
    self.cluster_size = self.variable("codebook", "cluster_size", jnp.zeros, (k,), jnp.float32)
    self.embed_sum = self.variable("codebook", "embed_sum", lambda: self.embeddings.value)
    self.initialized = self.variable("codebook", "initialized", lambda: jnp.array(False))

  def __call__(self, z: Array, train: bool = False) -> dict[str, Array]:
    """Quantises `z` (..., D).

    Returns a dict with `quantized` (straight-through, shape of z), `indices` (z.shape[:-1]),
    `commitment_loss` (mean squared distance to the stop-gradient codes, unweighted),
    `perplexity` (exp entropy of the batch code usage) and `live_codes` (codes used in the batch).
    The codebook is updated only when `train` and the `"codebook"` collection is mutable.
    """
    k = self.n_codes
    flat = lax.stop_gradient(z.reshape(-1, self.embedding_dim).astype(jnp.float32))
    update = train and self.is_mutable_collection("codebook") and not self.is_initializing()

    if update:
      key_init, key_restart = jax.random.split(self.make_rng("codebook"))

      def from_data():
        e = sample_vectors(key_init, flat, k)
        return e, jnp.ones((k,), jnp.float32), e

      def current():
        return self.embeddings.value, self.cluster_size.value, self.embed_sum.value

      emb, cluster_size, embed_sum = lax.cond(self.initialized.value, current, from_data)
    else:
      emb = self.embeddings.value

    idx = nearest_code(flat, emb)
    codes = emb[idx]
    counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)

    if update:
      sums = jax.ops.segment_sum(flat, idx, num_segments=k)
      cluster_size = self.decay * cluster_size + (1.0 - self.decay) * counts
      embed_sum = self.decay * embed_sum + (1.0 - self.decay) * sums
      n = jnp.sum(cluster_size)
      smoothed = (cluster_size + self.eps) / (n + k * self.eps) * n
      new_emb = embed_sum / smoothed[:, None]
      if self.restart_dead_codes:
        fresh = sample_vectors(key_restart, flat, k)
        dead = cluster_size < 1.0
        new_emb = jnp.where(dead[:, None], fresh, new_emb)
        embed_sum = jnp.where(dead[:, None], fresh, embed_sum)
        cluster_size = jnp.where(dead, 1.0, cluster_size)
      self.embeddings.value = new_emb
      self.embed_sum.value = embed_sum
      self.cluster_size.value = cluster_size
      self.initialized.value = jnp.array(True)

    e = codes.reshape(z.shape).astype(z.dtype)
    quantized = z + lax.stop_gradient(e - z)
    commitment = jnp.mean((z.astype(jnp.float32) - lax.stop_gradient(codes.reshape(z.shape))) ** 2)
    probs = counts / flat.shape[0]
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return {
      "quantized": quantized,
      "indices": idx.reshape(z.shape[:-1]),
      "commitment_loss": commitment,
      "perplexity": perplexity,
      "live_codes": jnp.sum(counts > 0).astype(jnp.int32),
    }

  def lookup(self, indices: Array) -> Array:
    """Code vectors for integer `indices`: shape indices.shape + (D,)."""
    return self.embeddings.value[indices]

  def nearest(self, z: Array) -> Array:
    """Index of the nearest code for each vector of `z` (..., D)."""
    flat = z.reshape(-1, self.embedding_dim).astype(jnp.float32)
    return nearest_code(flat, self.embeddings.value).reshape(z.shape[:-1])

  def snap(self, z: Array) -> Array:
    """Replaces every vector of `z` (..., D) by its nearest code (no gradient path)."""
    return self.lookup(self.nearest(z)).astype(z.dtype)

"""Rectified flow matching in latent space: paths, time sampling, loss, latent normalisation.

Convention (thesis Algorithm 2): data z0 at t = 0, noise z1 ~ N(0, I) at t = 1,
z_t = (1 - t) z0 + t z1, and the network regresses the constant velocity u = z1 - z0.
Sampling therefore integrates dz/dt = v(z, t) from t = 1 down to t = 0.
"""

from collections.abc import Callable, Mapping
import json
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LOSS_KINDS = ("l2", "l1", "hybrid")
TIME_SAMPLINGS = ("uniform", "logit_normal")


def _per_example(t: Array, like: Array) -> Array:
  """Reshapes a scalar or `(B,)` time to broadcast against `like` `(B, ...)`."""
  t = jnp.asarray(t, like.dtype)
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def interpolate(z0: Array, z1: Array, t: Array) -> Array:
  """Straight path z_t = (1 - t) z0 + t z1.

  Args:
    z0: (B, ...) data latents (t = 0).
    z1: (B, ...) noise, the same shape (t = 1).
    t: a scalar or (B,) times in [0, 1].
  Returns:
    (B, ...) points on the paths, z0's shape and dtype.
  """
  t = _per_example(t, z0)
  return (1.0 - t) * z0 + t * z1


def target_velocity(z0: Array, z1: Array) -> Array:
  """Velocity of the straight path from data to noise, dz_t/dt = z1 - z0 (the same at every t).

  Args:
    z0: (B, ...) data latents (t = 0).
    z1: (B, ...) noise, the same shape (t = 1).
  Returns:
    (B, ...) velocities, z0's shape and dtype.
  """
  return z1 - z0


def sample_time(
  key: Array, batch: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> Array:
  """Training times for one batch.

  Args:
    key: PRNG key.
    batch: number of times B.
    kind: `uniform` on [0, 1], or `logit_normal` = sigmoid(N(mean, std^2)) in (0, 1).
    mean, std: the logit-normal's location and scale (ignored for `uniform`).
  Returns:
    (B,) float32 times in [0, 1].
  """
  if kind == "uniform":
    return jax.random.uniform(key, (batch,))
  if kind == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
  raise ValueError(f"unknown time sampling {kind!r}; choose one of {TIME_SAMPLINGS}")


def fm_loss(pred: Array, target: Array, kind: str = "l2") -> Array:
  """Flow-matching regression loss, a float32 scalar >= 0.

  Args:
    pred, target: predicted and target velocities of the same shape.
    kind: `l2` (mean squared error), `l1` (mean absolute error) or `hybrid` = 0.9 L1 + 0.1 L2.
  Returns:
    The mean over all elements.
  """
  diff = (pred - target).astype(jnp.float32)
  if kind == "l2":
    return jnp.mean(diff**2)
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  if kind == "hybrid":
    return 0.9 * jnp.mean(jnp.abs(diff)) + 0.1 * jnp.mean(diff**2)
  raise ValueError(f"unknown loss {kind!r}; choose one of {LOSS_KINDS}")


def drop_labels(key: Array, labels: Array, p_uncond: float, null_label: int) -> Array:
  """Classifier-free guidance training: each label becomes `null_label` with probability
  `p_uncond`, so one network learns both the conditional and the unconditional field.

  Args:
    key: PRNG key of the drops.
    labels: int `(B,)` classes in [0, null_label).
    p_uncond: probability in [0, 1] that a label is dropped.
    null_label: the network's null class (its number of classes).
  Returns:
    int32 `(B,)`: each label, or `null_label` where it was dropped.
  """
  drop = jax.random.bernoulli(key, p_uncond, labels.shape)
  return jnp.where(drop, null_label, labels).astype(jnp.int32)


def label_condition(
  key: Array, labels: Array | None, num_classes: int, p_uncond: float, train: bool
) -> dict[str, Array]:
  """The network's `label` keyword for one batch.

  Args:
    key: the batch's PRNG key; the drops are drawn from `fold_in(key, 3)`, leaving the other
      draws of `key` unchanged.
    labels: int `(B,)` classes in [0, num_classes), or None for an unconditional model.
    num_classes: the network's classes (0: unconditional).
    p_uncond: probability in [0, 1] that a label is dropped to the null class `num_classes`.
    train: drop labels (training) or pass them unchanged (evaluation).
  Returns:
    `{}` for an unconditional model, else `{"label": int (B,)}`; a ValueError if a
    conditional model gets no labels.
  """
  if num_classes <= 0:
    return {}
  if labels is None:
    raise ValueError("a class-conditional model needs labels")
  if not train:
    return {"label": labels}
  return {"label": drop_labels(jax.random.fold_in(key, 3), labels, p_uncond, num_classes)}


def make_fm_loss_fn(
  apply_fn: Callable[..., Array], flow_cfg: Mapping[str, Any], num_classes: int = 0
) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """Builds `loss_fn(params, z0, key, train=True, labels=None) -> (loss, metrics)`.

  `apply_fn(variables, z, t, train=..., rngs=..., label=...)` is a velocity network's `apply`
  (e.g. `UNet3D(...).apply`) and `params` its `params` collection. `flow_cfg` needs `loss` and
  `time_sampling` (plus `logit_normal_mean` / `logit_normal_std` for `logit_normal`, and
  `p_uncond` for a conditional network). `z0` is a batch of normalised latents `(B, d, h, w,
  C)`; `key` draws the noise, the times, the dropout masks and the dropped labels. With
  `num_classes > 0`, `labels` int `(B,)` in [0, num_classes) are required; each is replaced
  by the null class `num_classes` with probability `p_uncond` while training.

  Args:
    apply_fn: the velocity network's apply, (B, D, H, W, C) latents and (B,) times -> velocities.
    flow_cfg: a flow config's `flow` section.
    num_classes: the network's classes (0: unconditional).
  Returns:
    `loss_fn(params, z0 (B, D, H, W, C), key, train, labels) -> (loss, {"loss", "l1", "l2"})`,
    all float32 scalars.
  """
  kind = flow_cfg["loss"]
  sampling = flow_cfg["time_sampling"]
  mean = float(flow_cfg.get("logit_normal_mean", 0.0))
  std = float(flow_cfg.get("logit_normal_std", 1.0))
  fm_loss(jnp.zeros(()), jnp.zeros(()), kind)  # fail early on an unknown loss
  sample_time(jax.random.key(0), 1, sampling, mean, std)  # ... or time sampling
  p_uncond = float(flow_cfg.get("p_uncond", 0.0))
  if not 0.0 <= p_uncond <= 1.0:
    raise ValueError(f"flow.p_uncond must be in [0, 1], got {p_uncond}")

  def loss_fn(
    params: Any, z0: Array, key: Array, train: bool = True, labels: Array | None = None
  ) -> tuple[Array, dict[str, Array]]:
    noise_key, time_key, dropout_key = jax.random.split(key, 3)
    cond = label_condition(key, labels, num_classes, p_uncond, train)
    # Drawn flat: XLA:CPU compiles rank-5 random draws slowly.
    z1 = jax.random.normal(noise_key, (z0.size,), z0.dtype).reshape(z0.shape)
    t = sample_time(time_key, z0.shape[0], sampling, mean, std)
    target = target_velocity(z0, z1)
    pred = apply_fn(
      {"params": params},
      interpolate(z0, z1, t),
      t,
      train=train,
      rngs={"dropout": dropout_key},
      **cond,
    )
    loss = fm_loss(pred, target, kind)
    diff = (pred - target).astype(jnp.float32)
    metrics = {"loss": loss, "l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(diff**2)}
    return loss, metrics

  return loss_fn


@flax.struct.dataclass
class LatentStats:
  """Per-channel mean and standard deviation of the encoder latents (a JAX pytree)."""

  mean: Array
  std: Array

  def to_dict(self) -> dict[str, list[float]]:
    """Plain lists of floats, ready for `json.dump`.

    Returns:
      `{"mean": [C floats], "std": [C floats]}`.
    """
    return {
      "mean": np.asarray(self.mean, np.float64).tolist(),
      "std": np.asarray(self.std, np.float64).tolist(),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LatentStats":
    """The statistics `to_dict` wrote.

    Args:
      d: a mapping with `mean` and `std`, C numbers each.
    Returns:
      `LatentStats` with float32 (C,) `mean` and `std`.
    """
    return cls(mean=np.asarray(d["mean"], np.float32), std=np.asarray(d["std"], np.float32))

  def to_json(self) -> str:
    """`to_dict` as a JSON string.

    Returns:
      `{"mean": [...], "std": [...]}` as JSON text.
    """
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, s: str) -> "LatentStats":
    """The statistics `to_json` wrote.

    Args:
      s: JSON text with `mean` and `std`, C numbers each.
    Returns:
      `LatentStats` with float32 (C,) `mean` and `std`.
    """
    return cls.from_dict(json.loads(s))


def compute_latent_stats(latents: Array | np.ndarray, eps: float = 1e-6) -> LatentStats:
  """Per-channel statistics of encoder latents.

  Args:
    latents: (..., C) latents; statistics are taken over every axis but the last.
    eps: floor of the standard deviation, so that normalising never divides by zero.
  Returns:
    `LatentStats` with float32 (C,) `mean` and `std` (>= eps), computed in float64.
  """
  x = np.asarray(latents, np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axis=axes)
  std = np.maximum(x.std(axis=axes), eps)
  return LatentStats(mean=mean.astype(np.float32), std=std.astype(np.float32))


def normalize(z: Array, stats: LatentStats) -> Array:
  """(z - mean) / std per channel: encoder latents to about zero mean and unit variance.

  Args:
    z: (..., C) latents as the encoder gives them.
    stats: their per-channel statistics (`compute_latent_stats`).
  Returns:
    (..., C) normalised latents, z's dtype.
  """
  return (z - jnp.asarray(stats.mean, z.dtype)) / jnp.asarray(stats.std, z.dtype)


def denormalize(z: Array, stats: LatentStats) -> Array:
  """Inverse of `normalize`, z * std + mean per channel: back to the encoder's latents.

  Args:
    z: (..., C) normalised latents (e.g. a sampler's output).
    stats: the per-channel statistics they were normalised with.
  Returns:
    (..., C) latents as the decoder takes them, z's dtype.
  """
  return z * jnp.asarray(stats.std, z.dtype) + jnp.asarray(stats.mean, z.dtype)

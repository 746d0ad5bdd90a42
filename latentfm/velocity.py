"""A trained network as the velocity field `fn(z, t)` that the samplers integrate.

`velocity_from_model` wraps a network and its parameters; `guided` conditions the same field on
class labels with a classifier-free guidance weight. The wrapper is a pytree whose parameters,
labels and guidance weight are traced leaves, so new values reuse the compiled solve.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class ModelVelocity:
  """`velocity_fn(z, t)` from a network `apply_fn(variables, z, t_batch, train=False[, label])`.

  A pytree: `params`, `labels` and `guidance` are traced leaves, `apply_fn` and `null_label`
  are static, so sampling with new parameters, labels or guidance weights reuses the compiled
  integrator (keep using the same module object).

  With `labels` int `(B,)`, the field is classifier-free guided:
  v = v_u + guidance * (v_c - v_u), where v_c is conditioned on `labels` and v_u on
  `null_label`; both come from one network call on the doubled batch, which `integrate`
  counts as one evaluation (its cost is that of a 2B batch). `guidance` 0 gives the
  unconditional field, 1 the conditional one.
  """

  apply_fn: Callable[..., Array] = flax.struct.field(pytree_node=False)
  params: Any
  labels: Array | None = None
  guidance: Array | float = 1.0
  null_label: int | None = flax.struct.field(pytree_node=False, default=None)

  def __call__(self, z: Array, t: Array) -> Array:
    """The field at latents `z` (B, d, h, w, C) and scalar time `t` in [0, 1].

    Returns:
      The velocity (or, for a DDPM network, the predicted noise), shape and dtype of `z`.
    """
    b = z.shape[0]
    tb = jnp.full((b,), t, jnp.float32)
    if self.labels is None:
      return self.apply_fn({"params": self.params}, z, tb, train=False)
    null = jnp.full((b,), self.null_label, jnp.int32)
    both = self.apply_fn(
      {"params": self.params},
      jnp.concatenate([z, z]),
      jnp.concatenate([tb, tb]),
      train=False,
      label=jnp.concatenate([jnp.asarray(self.labels, jnp.int32), null]),
    )
    v_c, v_u = both[:b], both[b:]
    return v_u + jnp.asarray(self.guidance, z.dtype) * (v_c - v_u)


def velocity_from_model(
  apply_fn: Callable[..., Array],
  params: Any,
  *,
  labels: Array | None = None,
  guidance: float = 1.0,
  null_label: int | None = None,
) -> ModelVelocity:
  """Wraps e.g. `UNet3D(...).apply` and its `params` as `velocity_fn(z, t)` (t broadcast).

  Args:
    apply_fn: the network's `apply(variables, z (B, d, h, w, C), t (B,), train=False[,
      label (B,)])`, returning an array shaped as `z`.
    params: the network's parameters (a pytree), e.g. the EMA weights.
    labels: None (the network's own default: unconditional) or int `(B,)` class labels for
      classifier-free guidance, which then needs `null_label` (the network's null class).
    guidance: the guidance weight w (0: unconditional, 1: conditional, > 1: amplified).
    null_label: the class index the network reserves for "no class"; None for an
      unconditional network.

  Returns:
    A `ModelVelocity`, callable as `fn(z (B, d, h, w, C), t scalar) -> (B, d, h, w, C)`.
  """
  if labels is not None and null_label is None:
    raise ValueError("guided sampling needs the null_label of the conditional network")
  return ModelVelocity(
    apply_fn=apply_fn,
    params=params,
    labels=labels,
    guidance=jnp.asarray(guidance, jnp.float32),
    null_label=null_label,
  )


def guided(velocity: ModelVelocity, labels: Array | None, guidance: float) -> ModelVelocity:
  """The same trained field conditioned on `labels` with weight `guidance`.

  Args:
    velocity: a field from `velocity_from_model` with its `null_label` set.
    labels: None (return `velocity` unchanged) or int `(B,)` classes in 0..num_classes-1.
    guidance: the guidance weight w (0: unconditional, 1: conditional, > 1: amplified).

  Returns:
    A `ModelVelocity` sharing `velocity`'s network and parameters.
  """
  if labels is None:
    return velocity
  return dataclasses.replace(
    velocity, labels=jnp.asarray(labels, jnp.int32), guidance=jnp.asarray(guidance, jnp.float32)
  )

"""Latent generative-model train state and the pure jitted train step (built by a factory).

State (a plain dict): `step`, `params`, `ema_params` (EMA of the weights, used for sampling),
`opt` and the root `rng`. Batches hold normalised latents under "image": (B, d, h, w, C), and
for a class-conditional model their int32 labels under "label": (B,).
`flow.objective` picks what the UNet learns: `rectified_flow` (the velocity, `latentfm.flow`)
or `ddpm` (the noise, `latentfm.ddpm`); state, optimizer, EMA and sharding are the same.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from latentfm import ddpm, flow
from latentfm.nn.unet3d import UNet3D
from latentfm.nn.vqgan import to_model_range
from latentfm.train import compiler, schedules

State = dict[str, Any]
OBJECTIVES = ("rectified_flow", "ddpm")


def objective(config: ml_collections.ConfigDict) -> str:
  """`config.flow.objective` (`rectified_flow` for configs written before the option)."""
  name = config.flow.get("objective", "rectified_flow")
  if name not in OBJECTIVES:
    raise ValueError(f"unknown flow.objective {name!r}; choose one of {OBJECTIVES}")
  return name


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable[..., tuple[Any, dict]]:
  """`loss_fn(params, z0, key, train=True, labels=None) -> (loss, metrics)` of the configured
  objective (a class-conditional UNet takes the batch's labels, either objective)."""
  model = UNet3D.from_config(config.model)
  if objective(config) == "ddpm":
    return ddpm.make_ddpm_loss_fn(
      model.apply, config.ddpm, model.num_classes, config.flow.get("p_uncond", 0.0)
    )
  return flow.make_fm_loss_fn(model.apply, config.flow, model.num_classes)


def make_optimizer(
  optim: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
  """AdamW after global-norm gradient clipping; the rate follows `schedules.learning_rate`."""
  return optax.chain(
    optax.clip_by_global_norm(optim.grad_clip),
    optax.adamw(schedules.learning_rate(optim, num_steps), weight_decay=optim.weight_decay),
  )


def create_state(
  key: jax.Array, config: ml_collections.ConfigDict, latent_shape: Sequence[int]
) -> State:
  """A fresh state for latents of `latent_shape` = (d, h, w, C)."""
  model = UNet3D.from_config(config.model)
  k_init, k_rng = jax.random.split(key)
  z = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
  params = compiler.jit(lambda k: model.init(k, z, jnp.zeros((1,)), train=False))(k_init)["params"]
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "ema_params": jax.tree.map(jnp.copy, params),
    "opt": make_optimizer(config.optim, config.train.num_steps).init(params),
    "rng": k_rng,
  }


def make_train_step(
  config: ml_collections.ConfigDict,
) -> Callable[[State, dict], tuple[State, dict]]:
  """Pure `step(state, batch) -> (state, metrics)`: one update of the configured objective
  plus the weight EMA."""
  loss_fn = make_loss_fn(config)
  tx = make_optimizer(config.optim, config.train.num_steps)
  ema_rate = 1.0 - config.optim.ema_decay

  def step(state: State, batch: dict) -> tuple[State, dict]:
    key = jax.random.fold_in(state["rng"], state["step"])
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], batch["image"], key, labels=batch.get("label")
    )
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optax.incremental_update(params, state["ema_params"], ema_rate)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return dict(state, params=params, ema_params=ema, opt=opt, step=state["step"] + 1), metrics

  return step


def encode_volumes(
  model, variables: dict, volumes: np.ndarray, batch_size: int = 4, progress: Callable | None = None
) -> np.ndarray:
  """Continuous (pre-quantisation) latents of volumes [N, D, H, W] in [0, 1]."""
  encode = compiler.jit(lambda v, x: model.apply(v, to_model_range(x), method=model.encode))
  chunks = range(0, len(volumes), batch_size)
  out = [
    np.asarray(encode(variables, jnp.asarray(volumes[i : i + batch_size, ..., None])))
    for i in (progress(chunks) if progress else chunks)
  ]
  return np.concatenate(out)

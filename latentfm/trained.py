"""A trained pipeline loaded from its workdirs, the checks on what is fed to it, and decoding.

`load` restores the latent model's EMA network and the VQ-GAN that decodes its latents as one
`Models`; `decode` turns normalised latents into volumes in [0, 1], whole or in tiles.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latentfm import ddpm
from latentfm.flow import LatentStats, denormalize
from latentfm.nn.vqgan import from_model_range
from latentfm.train import compiler
from latentfm.velocity import ModelVelocity, velocity_from_model

Array = jax.Array

# Inputs may overshoot [0, 1] by this much (interpolation, float rounding) before it is an error.
RANGE_TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Models:
  """A trained pipeline: the latent model's EMA network and the VQ-GAN that decodes its latents.

  `velocity` is the EMA network as `fn(z, t)`: the velocity field for `objective`
  `rectified_flow`, the noise predictor at network time t = step / T for `ddpm` (whose noise
  schedule is `schedule`).
  """

  velocity: ModelVelocity
  vqgan: Any
  vqgan_variables: dict
  stats: LatentStats
  latent_shape: tuple[int, ...]
  flow_step: int
  vqgan_step: int
  num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 can be asked for
  # The VQ-GAN's training data geometry (median voxel size, orientation); None if not recorded.
  geometry: Any = None
  objective: str = "rectified_flow"
  schedule: ddpm.Schedule | None = None


def load(workdir: str, vqgan_workdir: str | None = None) -> Models:
  """Loads a trained flow (EMA weights) and its VQ-GAN from their checkpoints.

  Args:
    workdir: the flow stage's workdir (its config, latent statistics and latest checkpoint).
    vqgan_workdir: the VQ-GAN stage's workdir; None takes the one the flow config names.

  Returns:
    `Models` with the EMA network as `velocity`, the VQ-GAN and its variables, the latent
    statistics, `latent_shape` (d, h, w, C), both checkpoint steps, `num_classes` (0:
    unconditional), the training data's geometry (None if not recorded), the objective
    (`rectified_flow` or `ddpm`) and, for DDPM, its noise schedule.
  """
  from latentfm.data import geometry  # pylint: disable=import-outside-toplevel
  from latentfm.nn.unet3d import UNet3D  # pylint: disable=import-outside-toplevel
  from latentfm.train import flow_step, stages  # pylint: disable=import-outside-toplevel

  config = stages.load_stage_config(workdir, "flow")
  vqgan_workdir = vqgan_workdir or config.vqgan_workdir
  vq_config, vq_model, vq_vars, vq_step = stages.restore_vqgan(vqgan_workdir)
  meta = stages.read_extra(workdir)
  shape = tuple(int(s) for s in meta["latent_shape"])
  state, extra, step = stages.restore_latest(
    workdir, flow_step.create_state, jax.random.PRNGKey(0), config, shape
  )
  unet = UNet3D.from_config(config.model)
  velocity = velocity_from_model(
    unet.apply, state["ema_params"], null_label=unet.num_classes or None
  )
  objective = flow_step.objective(config)
  schedule = (
    ddpm.schedule_from_config(config.ddpm, extra.get("latent_abs_max"))
    if objective == "ddpm"
    else None
  )
  return Models(
    velocity=velocity,
    vqgan=vq_model,
    vqgan_variables=vq_vars,
    stats=LatentStats.from_dict(extra["latent_stats"]),
    latent_shape=shape,
    flow_step=step,
    vqgan_step=vq_step,
    num_classes=unet.num_classes,
    geometry=geometry.read(vqgan_workdir),
    objective=objective,
    schedule=schedule,
  )


def _check_labels(models: Models, labels: Any, num: int) -> np.ndarray | None:
  """`labels` (None, one int, or `num` ints) as int32 `(num,)`, checked against the model."""
  if labels is None:
    return None
  if models.num_classes == 0:
    raise ValueError("labels given, but this flow is unconditional (model.num_classes = 0)")
  out = np.broadcast_to(np.asarray(labels), (num,)) if np.ndim(labels) == 0 else np.asarray(labels)
  if out.shape != (num,) or not np.issubdtype(out.dtype, np.integer):
    raise ValueError(f"labels must be one integer or {num} integers, got {np.asarray(labels)!r}")
  if out.min() < 0 or out.max() >= models.num_classes:
    raise ValueError(f"labels must be in 0..{models.num_classes - 1}, got {sorted(set(out))}")
  return out.astype(np.int32)


def volume_shape(models: Models) -> tuple[int, int, int]:
  """The volumes the VQ-GAN encodes to `models.latent_shape`.

  Args:
    models: from `load`.

  Returns:
    (D, H, W): each latent axis times the VQ-GAN's downsampling factor on it.
  """
  return tuple(int(s) * int(f) for s, f in zip(models.latent_shape[:3], models.vqgan.downsample))


def _check_batch(name: str, array: Array, expected: tuple[int, ...]) -> None:
  if tuple(array.shape[1:]) != tuple(expected) or array.ndim != len(expected) + 1:
    raise ValueError(
      f"{name} must have shape [N, {', '.join(map(str, expected))}] for this "
      f"model, got {tuple(array.shape)}"
    )


@compiler.jit(static_argnums=0)
def _snap(model, variables, z):
  return model.apply(variables, z, method=lambda m, v: m.quantize(v)["quantized"])


@compiler.jit(static_argnums=(0, 3))
def _decode(model, variables, z, snap):
  if snap:
    z = _snap(model, variables, z)
  return from_model_range(model.apply(variables, z, method=model.decode))[..., 0]


def decode(
  models: Models,
  z0: Array,
  snap_to_codebook: bool = False,
  *,
  tile: Any = None,
  overlap: int | None = None,
) -> Array:
  """Normalised latents → volumes [N, D, H, W] in [0, 1] (optionally snapped to the codebook).

  Args:
    models: from `load`.
    z0: normalised latents [N, *models.latent_shape] (as `integrate` returns them: about
      N(0, I) per channel); they are un-normalised with `models.stats` before decoding.
    snap_to_codebook: replace each latent vector by its nearest code first.
    tile: None decodes each volume whole; an int (or 3 ints) decodes it in overlapping tiles of
      that many latent voxels with blended seams, so that memory is bounded by the tile
      (`latentfm.tiled_decode`: the same volumes up to float rounding with the default overlap).
    overlap: latent voxels shared by neighbouring tiles (None: the exact default).

  Returns:
    Volumes [N, *volume_shape(models)], float32 in [0, 1].
  """
  _check_batch("z0", z0, models.latent_shape)
  z = denormalize(z0, models.stats)
  if tile is None:
    return _decode(models.vqgan, models.vqgan_variables, z, bool(snap_to_codebook))
  from latentfm.tiled_decode import decode_tiled  # pylint: disable=import-outside-toplevel

  if snap_to_codebook:
    z = _snap(models.vqgan, models.vqgan_variables, z)
  return jnp.asarray(decode_tiled(models.vqgan, models.vqgan_variables, z, tile, overlap))

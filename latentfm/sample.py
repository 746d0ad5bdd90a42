"""Sampling from the latent flow: the public notebook API.

  models = load("runs/demo/flow")
  volumes, nfe = sample(jax.random.PRNGKey(0), models, 4, solver="tsit5")
  write_samples("samples/", volumes, geometry=models.geometry)  # the training data's voxel size
  stage3, _ = sample(jax.random.PRNGKey(1), models, 4, labels=3, guidance=2.0)  # conditional
  edited, _ = edit(models, stage3, source_labels=3, target_labels=0)      # counterfactual

`integrate` solves dz/dt = v(z, t) from t = 1 (noise) to t = 0 (data). Fixed-step solvers
(`euler`, `heun`, `midpoint`) take `steps` equal steps; `euler` is thesis Algorithm 3 exactly.
Adaptive solvers (`tsit5`, `dopri5`) use a PID step-size controller and `steps` only sets the
initial step. Each returns the number of velocity evaluations actually made.

A model trained with the DDPM objective (`flow.objective = "ddpm"`, `latentfm.ddpm`) samples
with `ddpm` (ancestral over all T steps) or `ddim` (`steps` steps, noise level `eta`); `load`
reads the objective from the workdir's config and `sample` and `generate_latents` take either.
"""

from collections.abc import Callable
import dataclasses
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latentfm import ddpm
from latentfm.flow import LatentStats, denormalize, normalize
from latentfm.nn.vqgan import from_model_range, to_model_range
from latentfm.ode import SOLVERS, VelocityFn, integrate  # noqa: F401 (public API)
from latentfm.train import compiler

Array = jax.Array


ALL_SOLVERS = SOLVERS + ddpm.SAMPLERS  # rectified flow's ODE solvers, then the DDPM samplers


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
    labels: None (the network's own default: unconditional) or int `(B,)` class labels for
      classifier-free guidance, which then needs `null_label` (the network's null class).
    guidance: the guidance weight w (0: unconditional, 1: conditional, > 1: amplified).
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
  """The same trained field conditioned on `labels` int `(B,)` with weight `guidance`."""
  if labels is None:
    return velocity
  return dataclasses.replace(
    velocity, labels=jnp.asarray(labels, jnp.int32), guidance=jnp.asarray(guidance, jnp.float32)
  )


# ----------------------------------------------------------------------------- trained models


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

  `workdir` is the flow stage's workdir; its config names the VQ-GAN workdir unless
  `vqgan_workdir` is given.
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


def default_solver(objective: str) -> str:
  """The sampler `sample` uses when none is named: `euler` for rectified flow, the ancestral
  `ddpm` sampler for DDPM (on the trained demo DDPM, DDIM with eta 0 leaves the latents at about
  twice the data's spread and scores far worse; bench/RESULTS.md)."""
  return "ddpm" if objective == "ddpm" else "euler"


def check_solver(objective: str, solver: str) -> None:
  """ValueError unless `solver` samples models of `objective` (`rectified_flow` or `ddpm`)."""
  allowed = ddpm.SAMPLERS if objective == "ddpm" else SOLVERS
  if solver not in allowed:
    raise ValueError(
      f"solver {solver!r} does not sample a {objective} model; choose one of {allowed}"
    )


def generate_latents(
  network: VelocityFn,
  z1: Array,
  key: Array,
  *,
  objective: str = "rectified_flow",
  schedule: ddpm.Schedule | None = None,
  solver: str = "euler",
  steps: int = 50,
  eta: float = 0.0,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 4096,
) -> tuple[Array, Array]:
  """Noise `z1` (B, d, h, w, C) to normalised latents with either objective's sampler.

  Rectified flow integrates `network` (the velocity) with `solver` in `SOLVERS` (`key`
  unused; `steps`, `rtol`, `atol`, `max_steps` as for `integrate`). DDPM runs
  `ddpm.sample_ddpm` (`solver="ddpm"`) or `ddpm.sample_ddim` (`"ddim"`, `steps`, `eta`) with
  `network` as the noise predictor and `key` for the step noise.
  Returns `(z0 (B, d, h, w, C), nfe)`, nfe an int32 scalar: network evaluations per batch.
  """
  check_solver(objective, solver)
  if solver == "ddpm":
    return ddpm.sample_ddpm(network, z1, key, schedule)
  if solver == "ddim":
    return ddpm.sample_ddim(network, z1, key, schedule, steps=steps, eta=eta)
  return integrate(
    network, z1, solver=solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps
  )


@compiler.jit(static_argnums=0)
def _snap(model, variables, z):
  return model.apply(variables, z, method=lambda m, v: m.quantize(v)["quantized"])


@compiler.jit(static_argnums=(0, 3))
def _decode(model, variables, z, snap):
  if snap:
    z = _snap(model, variables, z)
  return from_model_range(model.apply(variables, z, method=model.decode))[..., 0]


# Inputs may overshoot [0, 1] by this much (interpolation, float rounding) before it is an error.
RANGE_TOLERANCE = 0.05


def volume_shape(models: Models) -> tuple[int, int, int]:
  """The (D, H, W) of the volumes the VQ-GAN encodes to `models.latent_shape`."""
  return tuple(int(s) * int(f) for s, f in zip(models.latent_shape[:3], models.vqgan.downsample))


def _check_batch(name: str, array: Array, expected: tuple[int, ...]) -> None:
  if tuple(array.shape[1:]) != tuple(expected) or array.ndim != len(expected) + 1:
    raise ValueError(
      f"{name} must have shape [N, {', '.join(map(str, expected))}] for this "
      f"model, got {tuple(array.shape)}"
    )


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
    z0: normalised latents [N, *models.latent_shape] (as `integrate` returns them).
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


def sample(
  key: Array,
  models: Models,
  num: int,
  *,
  labels: Any = None,
  guidance: float = 1.0,
  solver: str | None = None,
  steps: int = 50,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  eta: float = 0.0,
  snap_to_codebook: bool = False,
  batch_size: int = 8,
  max_steps: int = 4096,
  decode_tile: Any = None,
) -> tuple[np.ndarray, int]:
  """`num` synthetic volumes and the NFE per batch.

  Noise z1 ~ N(0, I) becomes latents through `generate_latents` with `solver` (default
  `default_solver(models.objective)`; see `integrate` for `steps`, `rtol`, `atol` and
  `max_steps`, `ddpm.sample_ddim` for `eta`), is un-normalised and decoded, `batch_size`
  volumes at a time.

  Args:
    labels: None (unconditional), one class or `num` classes (a class-conditional model only).
    guidance: classifier-free guidance weight w: v = v_u + w (v_c - v_u) (for a DDPM model the
      same on the predicted noise); 1 samples the conditional field, 0 the unconditional one.
      An evaluation of the guided field is one batched network call on twice the batch and
      counts as one NFE.
    decode_tile: None, or the tile size of a tiled decode (see `decode`).
  Returns:
    volumes float32 `[num, D, H, W]` in [0, 1], and the most NFE any batch used.
  """
  if num < 1:
    raise ValueError(f"num must be positive, got {num}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  labels = _check_labels(models, labels, num)
  solver = solver or default_solver(models.objective)
  out, nfe = [], 0
  for i, k in enumerate(jax.random.split(key, -(-num // batch_size))):
    lo = i * batch_size
    n = min(batch_size, num - lo)
    z1 = jax.random.normal(k, (n,) + models.latent_shape)
    velocity = guided(models.velocity, None if labels is None else labels[lo : lo + n], guidance)
    z0, used = generate_latents(
      velocity,
      z1,
      jax.random.fold_in(k, 1),
      objective=models.objective,
      schedule=models.schedule,
      solver=solver,
      steps=steps,
      eta=eta,
      rtol=rtol,
      atol=atol,
      max_steps=max_steps,
    )
    out.append(np.asarray(decode(models, z0, snap_to_codebook, tile=decode_tile)))
    nfe = max(nfe, int(used))
  return np.concatenate(out), nfe


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """`num` labels with equal counts per class (the first `num % num_classes` classes get one
  more), in class order. Returns int32 `(num,)`."""
  if num_classes < 1:
    raise ValueError("balanced sampling needs a class-conditional flow (model.num_classes > 0)")
  counts = num // num_classes + (np.arange(num_classes) < num % num_classes)
  return np.repeat(np.arange(num_classes, dtype=np.int32), counts)


def encode_to_noise(
  models: Models,
  volumes: Array,
  *,
  labels: Any = None,
  guidance: float = 1.0,
  solver: str = "tsit5",
  steps: int = 50,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  t_end: float = 1.0,
) -> tuple[Array, Array]:
  """Inverts real volumes: encode, normalise, integrate t = 0 → `t_end` (1: pure noise).

  Args:
    models: from `load`.
    volumes: `[N, *volume_shape(models)]` in [0, 1] (preprocessed as the VQ-GAN's data);
      shapes and values are checked.
    labels: None, or the volumes' classes (one or N) for a class-conditional flow.
    solver, steps, rtol, atol: as for `integrate`.
  Returns:
    latents at `t_end`, `(N, d, h, w, C)` (N(0, I)-like at `t_end = 1`), and the NFE used.
    Rectified-flow models only.
  """
  if models.objective != "rectified_flow":
    raise ValueError(
      f"encode_to_noise inverts rectified-flow models; this one is {models.objective!r}"
    )
  volumes = jnp.asarray(volumes, jnp.float32)
  _check_batch("volumes", volumes, volume_shape(models))
  low, high = float(jnp.min(volumes)), float(jnp.max(volumes))
  if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
    raise ValueError(
      f"volumes must hold values in [0, 1], got [{low:.4g}, {high:.4g}]; "
      "preprocess them as the VQ-GAN's data (latentfm.data.preprocess)"
    )
  x = to_model_range(volumes[..., None])
  labels = _check_labels(models, labels, x.shape[0])
  z = models.vqgan.apply(models.vqgan_variables, x, method=models.vqgan.encode)
  return integrate(
    guided(models.velocity, labels, guidance),
    normalize(z, models.stats),
    solver=solver,
    steps=steps,
    rtol=rtol,
    atol=atol,
    t0=0.0,
    t1=float(t_end),
  )


def edit(
  models: Models,
  volumes: Array,
  source_labels: Any,
  target_labels: Any,
  *,
  guidance: float = 1.0,
  strength: float = 1.0,
  solver: str = "tsit5",
  steps: int = 50,
  rtol: float = 1e-5,
  atol: float = 1e-5,
) -> tuple[np.ndarray, int]:
  """Counterfactual editing: the same scans at another class.

  Each scan is inverted under its own label up to t = `strength` (1: all the way to noise,
  smaller values keep more of the scan) with the conditional field, then integrated back to
  t = 0 under its target label with guidance weight `guidance`.

  Args:
    volumes: `[N, D, H, W]` in [0, 1]; source_labels, target_labels: one class or N classes.
  Returns:
    edited volumes float32 `[N, D, H, W]` in [0, 1], and the NFE of both solves together.
  """
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  n = np.shape(volumes)[0]
  noise, nfe_in = encode_to_noise(
    models,
    volumes,
    labels=source_labels,
    solver=solver,
    steps=steps,
    rtol=rtol,
    atol=atol,
    t_end=strength,
  )
  target = _check_labels(models, target_labels, n)
  z0, nfe_out = integrate(
    guided(models.velocity, target, guidance),
    noise,
    solver=solver,
    steps=steps,
    rtol=rtol,
    atol=atol,
    t0=float(strength),
    t1=0.0,
  )
  return np.asarray(decode(models, z0)), int(nfe_in) + int(nfe_out)


def write_samples(
  directory: str,
  volumes: np.ndarray,
  *,
  geometry: Any = None,
  spacing: float = 1.0,
  prefix: str = "sample",
  labels: Any = None,
) -> list[str]:
  """Writes volumes [N, D, H, W] as NIfTI plus one tri-planar PNG; returns the NIfTI paths.

  Args:
    geometry: a `latentfm.data.geometry.Geometry` (e.g. `Models.geometry`, the training data's
      median voxel size and orientation); None: `spacing` mm on every axis, identity
      direction. Either way the volume's centre is at (0, 0, 0) mm.
    labels: int `(N,)` (the classes they were sampled for): the file names carry the class,
      `<prefix>_<i>_class<k>.nii.gz`, and `labels.csv` lists file and class.
  `directory` must be new or empty (a ValueError otherwise); it appears only once complete.
  """
  from latentfm import atomic_write, viz  # pylint: disable=import-outside-toplevel
  from latentfm.data import geometry as geometry_lib  # pylint: disable=import-outside-toplevel
  from latentfm.data.io import write_volume  # pylint: disable=import-outside-toplevel

  geometry = geometry or geometry_lib.isotropic(spacing)
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(
      f"{directory} is not empty; samples are written only to a new or empty "
      "folder, so that no set mixes old and new samples"
    )
  suffix = lambda i: "" if labels is None else f"_class{int(labels[i])}"
  names = [f"{prefix}_{i:04d}{suffix(i)}.nii.gz" for i in range(len(volumes))]
  with atomic_write.atomic_dir(directory) as partial:
    for name, vol in zip(names, np.asarray(volumes)):
      write_volume(os.path.join(partial, name), geometry.volume(vol))
    if labels is not None:
      with open(os.path.join(partial, "labels.csv"), "w", encoding="utf-8") as f:
        f.write("file,label\n" + "".join(f"{n},{int(l)}\n" for n, l in zip(names, labels)))
    viz.save_triplanar(
      os.path.join(partial, f"{prefix}s.png"),
      volumes[:8],
      [f"{prefix} {i}{suffix(i).replace('_', ' ')}" for i in range(min(8, len(volumes)))],
    )
  return [os.path.join(directory, name) for name in names]

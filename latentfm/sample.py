"""Sampling from the latent flow: the public notebook API.

  models = load("runs/demo/flow")
  volumes, nfe = sample(jax.random.PRNGKey(0), models, 4, solver="tsit5")
  write_samples("samples/", volumes, geometry=models.geometry)  # the training data's voxel size
  stage3, _ = sample(jax.random.PRNGKey(1), models, 4, labels=3, guidance=2.0)  # conditional
  edited, _ = edit(models, stage3, source_labels=3, target_labels=0)      # counterfactual

This module holds the samplers (`generate_latents`, `sample`), the class balancing of a sample
set and `write_samples`. It re-exports the rest of the API from the modules that define it:
`integrate` and `SOLVERS` (`latentfm.ode`), `ModelVelocity`, `velocity_from_model` and `guided`
(`latentfm.velocity`), `Models`, `load`, `volume_shape` and `decode` (`latentfm.trained`), and
`encode_to_noise` and `edit` (`latentfm.editing`).

`integrate` solves dz/dt = v(z, t) from t = 1 (noise) to t = 0 (data). Fixed-step solvers
(`euler`, `heun`, `midpoint`) take `steps` equal steps; `euler` is thesis Algorithm 3 exactly.
Adaptive solvers (`tsit5`, `dopri5`) use a PID step-size controller and `steps` only sets the
initial step. Each returns the number of velocity evaluations actually made.

A model trained with the DDPM objective (`flow.objective = "ddpm"`, `latentfm.ddpm`) samples
with `ddpm` (ancestral over all T steps) or `ddim` (`steps` steps, noise level `eta`); `load`
reads the objective from the workdir's config and `sample` and `generate_latents` take either.
"""

import os
from typing import Any

import jax
import numpy as np

from latentfm import ddpm
from latentfm.editing import edit, encode_to_noise
from latentfm.ode import SOLVERS, VelocityFn, integrate
from latentfm.trained import RANGE_TOLERANCE, Models, _check_labels, decode, load, volume_shape
from latentfm.velocity import ModelVelocity, guided, velocity_from_model

# What this module defines, then what it re-exports from the modules that define it.
__all__ = [
  "ALL_SOLVERS",
  "balanced_labels",
  "check_solver",
  "default_solver",
  "generate_latents",
  "sample",
  "write_samples",
  "edit",
  "encode_to_noise",
  "SOLVERS",
  "VelocityFn",
  "integrate",
  "RANGE_TOLERANCE",
  "Models",
  "decode",
  "load",
  "volume_shape",
  "ModelVelocity",
  "guided",
  "velocity_from_model",
]

Array = jax.Array


ALL_SOLVERS = SOLVERS + ddpm.SAMPLERS  # rectified flow's ODE solvers, then the DDPM samplers


def default_solver(objective: str) -> str:
  """The sampler `sample` uses when none is named.

  The ancestral sampler for DDPM: DDIM with eta 0 carries the trained predictor's low-SNR
  error to the output (`latentfm.ddpm`, bench/RESULTS.md).

  Args:
    objective: `rectified_flow` or `ddpm`.
  Returns:
    `euler` for rectified flow, `ddpm` for DDPM.
  """
  return "ddpm" if objective == "ddpm" else "euler"


def check_solver(objective: str, solver: str) -> None:
  """Checks that a sampler fits the model's objective.

  Args:
    objective: `rectified_flow` or `ddpm`.
    solver: one of `ALL_SOLVERS`.
  Returns:
    None; a ValueError naming the allowed samplers unless `solver` is one of `SOLVERS` for
    rectified flow or of `ddpm.SAMPLERS` for DDPM.
  """
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
  """Noise `z1` to normalised latents with either objective's sampler.

  Rectified flow integrates `network` (the velocity) from t = 1 to 0 with `solver`. DDPM runs
  `ddpm.sample_ddpm` (`solver="ddpm"`, all T steps) or `ddpm.sample_ddim` (`"ddim"`) with
  `network` as the noise predictor.

  Args:
    network: `fn(z (B, d, h, w, C), t scalar) -> (B, d, h, w, C)`, e.g. a `ModelVelocity`.
    z1: (B, d, h, w, C) N(0, I) noise.
    key: PRNG key of DDPM's step noise (unused by rectified flow).
    objective: `rectified_flow` or `ddpm`.
    schedule: the DDPM noise schedule (`Models.schedule`); None for rectified flow.
    solver: one of `SOLVERS` for rectified flow, `ddpm` or `ddim` for DDPM (`check_solver`).
    steps: solver steps (`integrate`), or DDIM's steps.
    eta: DDIM's noise level in [0, 1] (0: deterministic).
    rtol, atol, max_steps: the adaptive solvers' tolerances and step limit (`integrate`).
  Returns:
    `(z0, nfe)`: normalised latents (B, d, h, w, C) (about N(0, I) per channel for a trained
    model), and nfe an int32 scalar: network evaluations per batch.
  """
  check_solver(objective, solver)
  if solver == "ddpm":
    return ddpm.sample_ddpm(network, z1, key, schedule)
  if solver == "ddim":
    return ddpm.sample_ddim(network, z1, key, schedule, steps=steps, eta=eta)
  return integrate(
    network, z1, solver=solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps
  )


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
    key: PRNG key of the noise (and of DDPM's step noise).
    models: from `load`.
    num: how many volumes, >= 1.
    labels: None (unconditional), one class or `num` classes (a class-conditional model only).
    guidance: classifier-free guidance weight w: v = v_u + w (v_c - v_u) (for a DDPM model the
      same on the predicted noise); 1 samples the conditional field, 0 the unconditional one.
      An evaluation of the guided field is one batched network call on twice the batch and
      counts as one NFE.
    solver: None (`default_solver`), or a sampler of the model's objective (`check_solver`).
    steps, rtol, atol, max_steps: as for `integrate` (`steps` also DDIM's steps).
    eta: DDIM's noise level in [0, 1].
    snap_to_codebook: replace each latent vector by its nearest code before decoding.
    batch_size: volumes per solve and decode, >= 1.
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
  """Class labels for a class-balanced sample set.

  Args:
    num: how many labels, >= 0.
    num_classes: the flow's classes, >= 1 (a ValueError otherwise).
  Returns:
    int32 `(num,)` in class order, equal counts per class; the first `num % num_classes`
    classes get one more.
  """
  if num_classes < 1:
    raise ValueError("balanced sampling needs a class-conditional flow (model.num_classes > 0)")
  counts = num // num_classes + (np.arange(num_classes) < num % num_classes)
  return np.repeat(np.arange(num_classes, dtype=np.int32), counts)


def write_samples(
  directory: str,
  volumes: np.ndarray,
  *,
  geometry: Any = None,
  spacing: float = 1.0,
  prefix: str = "sample",
  labels: Any = None,
) -> list[str]:
  """Writes volumes as NIfTI files plus one tri-planar PNG of the first eight.

  `directory` must be new or empty (a ValueError otherwise); it appears only once complete.

  Args:
    directory: the folder to create.
    volumes: float `[N, D, H, W]`, values in [0, 1] (as `sample` returns them).
    geometry: a `latentfm.data.geometry.Geometry` (e.g. `Models.geometry`, the training data's
      median voxel size and orientation); None: `spacing` mm on every axis, identity
      direction. Either way the volume's centre is at (0, 0, 0) mm.
    labels: int `(N,)` (the classes they were sampled for): the file names carry the class,
      `<prefix>_<i>_class<k>.nii.gz`, and `labels.csv` lists file and class.
    spacing: the isotropic voxel size in mm used when `geometry` is None.
    prefix: the start of the file names, `<prefix>_<i>.nii.gz`, and of the PNG's,
      `<prefix>s.png`.
  Returns:
    The N NIfTI paths, in volume order, under `directory`.
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

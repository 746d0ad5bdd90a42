r"""Trains latent rectified flow matching (stage 2) on a trained VQ-GAN's latents.

  python -m experiments.flow --config experiments/configs/flow.py:demo --workdir runs/demo/flow \
      --config.vqgan_workdir=runs/demo/vqgan
  python -m experiments.flow --config experiments/configs/flow.py:ddpm_demo --workdir runs/ddpm \
      --config.vqgan_workdir=runs/demo/vqgan   # the DDPM baseline (flow.objective = "ddpm")

Encodes the VQ-GAN's training volumes once (continuous pre-quantisation latents, cached in
`workdir/latents.npz`), normalises them per channel (statistics stored with every checkpoint),
and trains the 3D UNet velocity field (or, with `flow.objective = "ddpm"`, the same UNet as a
DDPM noise predictor: `latentfm.ddpm`). Resumes automatically. Every `train.sample_every` steps
it decodes samples from the EMA weights to `images/samples_<step>.png`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from latentfm import ddpm, flow, viz
from latentfm.data import loader
from latentfm.nn.unet3d import UNet3D
from latentfm.nn.vqgan import from_model_range
from latentfm.sample import check_solver, generate_latents, velocity_from_model
from latentfm.train import compiler, flow_step, runner, stages
from latentfm.train.flow_step import create_state, encode_volumes, make_train_step
from latentfm.train.loop import Periodic, check_nonfinite_policy, guard_step


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects impossible settings before any heavy work (ValueError naming the key)."""
  if not config.vqgan_workdir:
    raise ValueError("config.vqgan_workdir is required (a trained VQ-GAN stage)")
  if not os.path.isfile(os.path.join(config.vqgan_workdir, "config.json")):
    raise ValueError(f"config.vqgan_workdir {config.vqgan_workdir}: no trained VQ-GAN there")
  if config.train.batch_size < 1 or config.train.batch_size % jax.device_count():
    raise ValueError(
      f"train.batch_size {config.train.batch_size} must be positive and "
      f"divisible by the {jax.device_count()} devices"
    )
  flow.fm_loss(jnp.zeros(()), jnp.zeros(()), config.flow.loss)
  if flow_step.objective(config) == "ddpm":
    schedule = ddpm.schedule_from_config(config.ddpm)
    flow.fm_loss(jnp.zeros(()), jnp.zeros(()), config.ddpm.loss)
    if config.sample.solver == "ddim" and not 1 <= config.sample.steps <= schedule.num_timesteps:
      raise ValueError(
        f"sample.steps {config.sample.steps} must be in [1, "
        f"ddpm.num_timesteps={schedule.num_timesteps}] for ddim"
      )
  check_solver(flow_step.objective(config), config.sample.solver)
  check_nonfinite_policy(config.train.on_nonfinite)


def prepare_latents(config, workdir: str, main_process: bool):
  """(normalised train latents, stats, VQ-GAN (config, model, variables)), cached on disk."""
  vq_config, vq_model, vq_vars, vq_step = stages.restore_vqgan(config.vqgan_workdir)
  latent_spatial = [s // f for s, f in zip(vq_config.data.shape, vq_config.model.downsample)]
  factor = 2 ** (len(config.model.channel_mults) - 1)
  if any(s % factor for s in latent_spatial):
    raise ValueError(
      f"latent size {latent_spatial} is not divisible by 2^(levels-1) = {factor} "
      f"of model.channel_mults {tuple(config.model.channel_mults)}"
    )
  cache = os.path.join(workdir, "latents.npz")
  flip_axes = tuple(vq_config.data.flip_axes) if config.flow.get("flip_latents", False) else ()
  if os.path.isfile(cache):
    with np.load(cache) as f:
      latents, cached_step = f["latents"], int(f["vqgan_step"])
      cached_flips = tuple(int(a) for a in f["flip_axes"]) if "flip_axes" in f else ()
      labels = f["labels"] if "labels" in f else None
    if cached_flips != flip_axes:
      raise ValueError(
        f"{cache} was encoded with flips {cached_flips}, but flow.flip_latents "
        f"asks for {flip_axes}; use a new workdir"
      )
    if cached_step != vq_step:
      raise ValueError(
        f"{cache} was encoded with VQ-GAN step {cached_step}, but "
        f"{config.vqgan_workdir} is at step {vq_step}; use a new workdir"
      )
    if labels is None:  # a cache written before labels were stored
      train_ds, _ = loader.load_splits(vq_config.data, config.vqgan_workdir, vq_config.seed)
      labels = np.tile(train_ds.labels, 1 + len(flip_axes))
  else:
    train_ds, _ = loader.load_splits(vq_config.data, config.vqgan_workdir, vq_config.seed)
    volumes, labels = train_ds.volumes, np.tile(train_ds.labels, 1 + len(flip_axes))
    for axis in flip_axes:  # axes of the volume (D, H, W) = 0, 1, 2, as in the VQ-GAN's data
      volumes = np.concatenate([volumes, np.flip(volumes, axis=axis + 1)])
    latents = encode_volumes(
      vq_model, vq_vars, volumes, progress=common.file_progress("encode", main_process)
    )
    if main_process:
      os.makedirs(workdir, exist_ok=True)
      np.savez(
        cache + ".tmp.npz",
        latents=latents,
        vqgan_step=vq_step,
        flip_axes=np.asarray(flip_axes, np.int64),
        labels=labels,
      )
      os.replace(cache + ".tmp.npz", cache)
  stats = flow.compute_latent_stats(latents)
  normalised = np.asarray(flow.normalize(jnp.asarray(latents), stats))
  check_labels(labels, config.model.get("num_classes", 0), config.vqgan_workdir)
  return normalised, labels.astype(np.int32), stats, (vq_config, vq_model, vq_vars)


def check_labels(labels: np.ndarray, num_classes: int, vqgan_workdir: str) -> None:
  """A class-conditional flow needs every training label in [0, num_classes)."""
  if num_classes <= 0:
    return
  bad = sorted({int(l) for l in labels if not 0 <= l < num_classes})
  if bad:
    raise ValueError(
      f"config.model.num_classes = {num_classes}, but the training data of "
      f"{vqgan_workdir} has labels {bad} (-1: unlabelled); give every scan a "
      f"'stage' or 'label' in 0..{num_classes - 1} in manifest.csv, or set "
      "model.num_classes=0"
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, callbacks: Sequence[Periodic] = ()
) -> dict:
  """Trains (or resumes) the flow model in `workdir`; returns the last logged metrics.

  `callbacks` run after the sample previews, e.g. a benchmark's periodic evaluation.
  """
  with runner.open_stage("flow", config, workdir, validate=validate_config) as run:
    latents, labels, stats, (_, vq_model, vq_vars) = prepare_latents(
      config, workdir, run.main_process
    )
    dataset = loader.Dataset(latents, labels, tuple(map(str, range(len(latents)))))
    if config.flow.get("balance_classes", False):
      dataset = loader.class_balanced(dataset)
    state = run.start(
      create_state(jax.random.PRNGKey(config.seed), config, latents.shape[1:]), dataset
    )
    step_fn = compiler.jit(
      guard_step(make_train_step(config), config.train.on_nonfinite), donate_argnums=0
    )
    unet = UNet3D.from_config(config.model)
    objective = flow_step.objective(config)
    latent_abs_max = float(np.abs(latents).max())  # DDPM samplers clip z0 to it
    schedule = (
      ddpm.schedule_from_config(config.ddpm, latent_abs_max) if objective == "ddpm" else None
    )
    decode = compiler.jit(lambda v, z: vq_model.apply(v, z, method=vq_model.decode))
    num_classes = unet.num_classes
    preview_labels = np.arange(4) % num_classes if num_classes else None

    def samples(step, state):
      z1 = jax.random.normal(jax.random.PRNGKey(config.seed + 1), (4,) + latents.shape[1:])
      velocity = velocity_from_model(
        unet.apply,
        state["ema_params"],
        labels=preview_labels,
        guidance=config.sample.get("guidance", 1.0),
        null_label=num_classes or None,
      )
      z0, nfe = generate_latents(
        velocity,
        z1,
        jax.random.PRNGKey(config.seed + 2),
        objective=objective,
        schedule=schedule,
        solver=config.sample.solver,
        steps=config.sample.steps,
        eta=config.sample.get("eta", 0.0),
        rtol=config.sample.rtol,
        atol=config.sample.atol,
      )
      volumes = np.asarray(from_model_range(decode(vq_vars, flow.denormalize(z0, stats))))
      if run.main_process:
        viz.save_triplanar(
          os.path.join(workdir, "images", f"samples_{step:06d}.png"),
          volumes[..., 0],
          [
            f"sample {i}" if preview_labels is None else f"class {preview_labels[i]}"
            for i in range(len(volumes))
          ],
          title=f"flow step {step}, {config.sample.solver} NFE {int(nfe)}",
        )
        run.writer.write_image(step, "samples", viz.triplanar_image(volumes))
      return {"sample_nfe": float(nfe)}

    result = run.train(
      state,
      lambda s, b, i: step_fn(s, b),
      callbacks=[Periodic(config.train.sample_every, samples), *callbacks],
      extra={
        "latent_stats": stats.to_dict(),
        "latent_shape": list(latents.shape[1:]),
        "latent_abs_max": latent_abs_max,
      },
    )
  rows = [r for r in _rows(workdir) if "loss" in r]
  return {"step": result.step, "loss": rows[-1]["loss"] if rows else float("nan")}


def _rows(workdir):
  from latentfm.train.writer import read_metrics  # pylint: disable=import-outside-toplevel

  return read_metrics(workdir) if os.path.isfile(os.path.join(workdir, "metrics.jsonl")) else []


def main(argv: list[str]) -> None:
  common.define_flags("experiments/configs/flow.py:demo")
  config, workdir = common.parse_flags(argv)

  def run():
    metrics = train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      print(f"flow: step {metrics['step']}, loss {metrics['loss']:.4f}; outputs in {workdir}")

  common.run_guarded(run)


if __name__ == "__main__":
  main(sys.argv)

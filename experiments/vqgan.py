r"""Trains the 3D VQ-GAN (stage 1).

  python -m experiments.vqgan --config experiments/configs/vqgan.py:demo --workdir runs/vqgan_demo

Resumes automatically from the latest checkpoint in `--workdir`. Writes `metrics.jsonl`,
`tensorboard/`, `images/recon_<step>.png` (validation inputs vs reconstructions), `ckpt/` and
`config.json`.
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
import numpy as np

from experiments import common
from latentfm import viz
from latentfm.data import loader
from latentfm.train import compiler, parallel, runner
from latentfm.train.loop import Periodic, check_nonfinite_policy, guard_step
from latentfm.train.vqgan_step import create_state, make_eval_step, make_train_step


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects impossible settings before any heavy work (ValueError naming the key)."""
  shape, factors = tuple(config.data.shape), tuple(config.model.downsample)
  if len(shape) != 3 or len(factors) != 3:
    raise ValueError(f"data.shape and model.downsample need 3 entries, got {shape}, {factors}")
  for s, f in zip(shape, factors):
    if f < 1 or f & (f - 1) or s % f:
      raise ValueError(
        f"data.shape {shape} is not divisible by model.downsample {factors} (powers of two)"
      )
  if min(shape[1:]) < 16 and config.loss.perceptual_weight > 0:
    raise ValueError(f"data.shape {shape}: LPIPS slices need at least 16x16")
  if config.train.batch_size < 1:
    raise ValueError(f"train.batch_size must be positive, got {config.train.batch_size}")
  if config.train.batch_size % jax.device_count():
    raise ValueError(
      f"train.batch_size {config.train.batch_size} is not divisible by the "
      f"{jax.device_count()} devices"
    )
  if config.loss.gan_loss not in ("hinge", "vanilla"):
    raise ValueError(f"loss.gan_loss must be hinge or vanilla, got {config.loss.gan_loss!r}")
  check_nonfinite_policy(config.train.on_nonfinite)


def evaluate(eval_fn, state, val: loader.Dataset, mesh, limit: int) -> tuple[dict, np.ndarray]:
  """Mean validation metrics over the first `limit` volumes and their reconstructions."""
  images = val.volumes[:limit, ..., None]
  n_dev = jax.device_count()
  pad = (-len(images)) % n_dev
  batch = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
  out = jax.device_get(eval_fn(state, parallel.shard_batch(batch, mesh)))
  n = len(images)
  metrics = {f"val_{k}": float(np.mean(out[k][:n])) for k in ("l1", "psnr", "ssim")}
  return metrics, out["recon"][:n, ..., 0]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the VQ-GAN in `workdir`; returns the final validation metrics."""
  with runner.open_stage("vqgan", config, workdir, validate=validate_config) as run:
    train_ds, val_ds = loader.load_splits(
      config.data,
      workdir,
      config.seed,
      common.file_progress("preprocess", run.main_process),
      on_change=run.data_changed,
    )
    augmentation = (
      loader.Augment(tuple(config.data.flip_axes), tuple(config.data.intensity_range))
      if config.data.augment
      else None
    )
    state = run.start(
      create_state(jax.random.PRNGKey(config.seed), config), train_ds, augmentation=augmentation
    )
    mesh = run.mesh
    lpips_params = None
    if config.loss.perceptual_weight > 0:
      from latentfm.nn.lpips import load_params  # pylint: disable=import-outside-toplevel

      lpips_params = parallel.replicate(load_params(), mesh)
    policy = config.train.on_nonfinite
    warm = compiler.jit(
      guard_step(make_train_step(config, use_gan=False), policy), donate_argnums=0
    )
    full = compiler.jit(guard_step(make_train_step(config, use_gan=True), policy), donate_argnums=0)
    start = config.loss.discriminator_start

    def train_step(state, batch, step):
      return (full if step >= start else warm)(state, batch, lpips_params)

    eval_fn = compiler.jit(make_eval_step(config))
    limit = config.train.eval_volumes

    def validation(step, state):
      metrics, _ = evaluate(eval_fn, state, val_ds, mesh, limit)
      return metrics

    def images(step, state):
      _, recon = evaluate(eval_fn, state, val_ds, mesh, min(2, limit))
      pairs = np.stack([v for pair in zip(val_ds.volumes[:2], recon) for v in pair])
      if run.main_process:
        labels = [f"{kind} {name[:14]}" for name in val_ds.names[:2] for kind in ("input", "recon")]
        viz.save_triplanar(
          os.path.join(workdir, "images", f"recon_{step:06d}.png"),
          pairs,
          labels,
          title=f"VQ-GAN step {step}",
        )
        run.writer.write_image(step, "val/input_vs_recon", viz.triplanar_image(pairs))

    if run.first_step == 0:
      run.writer.write_scalars(0, validation(0, state))
      images(0, state)
    result = run.train(
      state,
      train_step,
      callbacks=[
        Periodic(config.train.eval_every, validation),
        Periodic(config.train.image_every, images),
      ],
    )
    return validation(result.step, result.state)


def main(argv: list[str]) -> None:
  common.define_flags("experiments/configs/vqgan.py:demo")
  config, workdir = common.parse_flags(argv)
  common.run_guarded(lambda: _report(train_and_evaluate(config, workdir), workdir))


def _report(metrics: dict, workdir: str) -> None:
  if jax.process_index() == 0:
    text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"vqgan: {text}; outputs in {workdir}")


if __name__ == "__main__":
  main(sys.argv)

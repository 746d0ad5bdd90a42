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
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from latentfm import viz
from latentfm.data import loader
from latentfm.train import checkpoint, host_memory, parallel
from latentfm.train.compiler import jit_train_step
from latentfm.train.loop import Periodic, check_nonfinite_policy, guard_step, resume, train_loop
from latentfm.train.vqgan_step import create_state, make_eval_step, make_train_step
from latentfm.train.writer import MetricWriter

def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects impossible settings before any heavy work (ValueError naming the key)."""
  shape, factors = tuple(config.data.shape), tuple(config.model.downsample)
  if len(shape) != 3 or len(factors) != 3:
    raise ValueError(f"data.shape and model.downsample need 3 entries, got {shape}, {factors}")
  for s, f in zip(shape, factors):
    if f < 1 or f & (f - 1) or s % f:
      raise ValueError(f"data.shape {shape} is not divisible by model.downsample {factors} "
                       "(powers of two)")
  if min(shape[1:]) < 16 and config.loss.perceptual_weight > 0:
    raise ValueError(f"data.shape {shape}: LPIPS slices need at least 16x16")
  if config.train.batch_size < 1:
    raise ValueError(f"train.batch_size must be positive, got {config.train.batch_size}")
  if config.train.batch_size % jax.device_count():
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices")
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
  parallel.maybe_initialize_distributed()
  if config.train.get("reuse_host_memory", True):  # configs written before the option
    host_memory.reuse_host_memory()
  validate_config(config)
  main_process = jax.process_index() == 0
  train_ds, val_ds = loader.load_splits(config.data, workdir, config.seed,
                                        common.file_progress("preprocess", main_process))
  mesh = parallel.make_mesh()
  state = parallel.replicate(create_state(jax.random.PRNGKey(config.seed), config), mesh)
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"),
                                    keep=config.train.keep_checkpoints)
  batch = parallel.process_batch_size(config.train.batch_size)
  data_iter = iter(loader.make_loader(
      train_ds, batch, train=True, seed=config.seed,
      augmentation=loader.Augment(tuple(config.data.flip_axes),
                                  tuple(config.data.intensity_range))
      if config.data.augment else None, worker_count=config.data.worker_count))
  state, first_step = resume(manager, state, data_iter)
  common.save_config(config, workdir)

  lpips_params = None
  if config.loss.perceptual_weight > 0:
    from latentfm.nn.lpips import load_params  # pylint: disable=import-outside-toplevel
    lpips_params = parallel.replicate(load_params(), mesh)
  policy = config.train.on_nonfinite
  warm = jit_train_step(guard_step(make_train_step(config, use_gan=False), policy),
                        donate_argnums=0)
  full = jit_train_step(guard_step(make_train_step(config, use_gan=True), policy),
                        donate_argnums=0)
  start = config.loss.discriminator_start

  def train_step(state, batch, step):
    return (full if step >= start else warm)(state, batch, lpips_params)

  eval_fn = jax.jit(make_eval_step(config))
  writer = MetricWriter(workdir, tensorboard=config.train.tensorboard,
                        resume_step=first_step, enabled=main_process)
  limit = config.train.eval_volumes

  def validation(step, state):
    metrics, _ = evaluate(eval_fn, state, val_ds, mesh, limit)
    return metrics

  def images(step, state):
    _, recon = evaluate(eval_fn, state, val_ds, mesh, min(2, limit))
    pairs = np.stack([v for pair in zip(val_ds.volumes[:2], recon) for v in pair])
    if main_process:
      labels = [f"{kind} {name[:14]}" for name in val_ds.names[:2] for kind in ("input", "recon")]
      viz.save_triplanar(os.path.join(workdir, "images", f"recon_{step:06d}.png"), pairs,
                         labels, title=f"VQ-GAN step {step}")
      writer.write_image(step, "val/input_vs_recon", viz.triplanar_image(pairs))

  if first_step == 0:
    writer.write_scalars(0, validation(0, state))
    images(0, state)
  with common.progress_bar(config.train.num_steps, first_step, "vqgan", main_process) as bar:
    result = train_loop(
        state, train_step, data_iter, mesh=mesh, first_step=first_step,
        num_steps=config.train.num_steps, manager=manager, writer=writer,
        log_every=config.train.log_every, ckpt_every=config.train.ckpt_every,
        callbacks=[Periodic(config.train.eval_every, validation),
                   Periodic(config.train.image_every, images)],
        extra={"stage": "vqgan"}, progress=bar,
        max_consecutive_skips=config.train.max_consecutive_skips)
  final = validation(result.step, result.state)
  checkpoint.close(manager)
  writer.close()
  if result.stopped_by_signal is not None and main_process:
    print(f"vqgan: stopped by signal {result.stopped_by_signal} at step {result.step}; "
          "checkpoint saved, rerun the same command to resume", file=sys.stderr)
  return final


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

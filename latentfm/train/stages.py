"""Restoring trained stages from their workdirs (config.json + latest Orbax checkpoint)."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from latentfm.train import checkpoint, parallel, run_record


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a stage saved as `workdir/config.json`, its paths made absolute."""
  saved = run_record.load_saved(workdir)
  if saved is None:
    raise FileNotFoundError(f"{workdir}: not a trained stage workdir (no config.json)")
  return ml_collections.ConfigDict(_tuples(saved))


def stage_of(config: ml_collections.ConfigDict) -> str:
  """ "flow" for a flow stage's config (it names its VQ-GAN), else "vqgan"."""
  return "flow" if "vqgan_workdir" in config else "vqgan"


def load_stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
  """`load_config`, refusing another stage's workdir with a line that says which it is."""
  config = load_config(workdir)
  found = stage_of(config)
  if found != stage:
    raise ValueError(f"{workdir} is a {found} workdir, but a {stage} workdir is needed here")
  return config


def _tuples(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def restore_latest(workdir: str, create_fn, *args) -> tuple[dict, dict, int]:
  """Restores `(state, extra, step)` of the latest checkpoint in `workdir/ckpt`.

  `create_fn(*args)` builds a fresh state; only its shapes are used (no compute).
  """
  mesh = parallel.make_mesh()
  sharding = parallel.replicated(mesh)
  abstract = jax.eval_shape(lambda: create_fn(*args))
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract
  )
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"), async_save=False)
  try:
    if checkpoint.latest_step(manager) is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint in {os.path.join(workdir, 'ckpt')}")
    state, _, extra, step = checkpoint.restore_newest_good(manager, abstract, set_aside=False)
  finally:
    checkpoint.close(manager)
  return state, extra, step


def restore_vqgan(workdir: str) -> tuple[ml_collections.ConfigDict, Any, dict, int]:
  """(config, VQGAN module, {"params", "codebook"} variables, step) of a trained VQ-GAN."""
  from latentfm.train import vqgan_step  # pylint: disable=import-outside-toplevel

  config = load_stage_config(workdir, "vqgan")
  state, _, step = restore_latest(workdir, vqgan_step.create_state, jax.random.PRNGKey(0), config)
  model = vqgan_step.models(config)[0]
  return config, model, {"params": state["params"], "codebook": state["codebook"]}, step


def read_extra(workdir: str) -> dict:
  """The JSON `extra` item of the latest checkpoint (e.g. latent statistics and shape)."""
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"), async_save=False)
  try:
    step = checkpoint.latest_step(manager)
    if step is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint in {os.path.join(workdir, 'ckpt')}")
    return checkpoint.read_extra(manager, step)
  finally:
    checkpoint.close(manager)

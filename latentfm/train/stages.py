"""Restoring trained stages from their workdirs (config.json + latest Orbax checkpoint)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from latentfm.train import checkpoint, parallel


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a stage saved as `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: not a trained stage workdir (no config.json)")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


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
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          abstract)
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"), async_save=False)
  try:
    step = checkpoint.latest_step(manager)
    if step is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint in {os.path.join(workdir, 'ckpt')}")
    state, _, extra = checkpoint.restore(manager, abstract, step)
  finally:
    checkpoint.close(manager)
  return state, extra, step


def restore_vqgan(workdir: str) -> tuple[ml_collections.ConfigDict, Any, dict, int]:
  """(config, VQGAN module, {"params", "codebook"} variables, step) of a trained VQ-GAN."""
  from latentfm.train import vqgan_step  # pylint: disable=import-outside-toplevel
  config = load_config(workdir)
  state, _, step = restore_latest(workdir, vqgan_step.create_state, jax.random.PRNGKey(0),
                                  config)
  model = vqgan_step.models(config)[0]
  return config, model, {"params": state["params"], "codebook": state["codebook"]}, step


def read_extra(workdir: str) -> dict:
  """The JSON `extra` item of the latest checkpoint (e.g. latent statistics and shape)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"), async_save=False)
  try:
    step = checkpoint.latest_step(manager)
    if step is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint in {os.path.join(workdir, 'ckpt')}")
    restored = manager.restore(step, args=ocp.args.Composite(
        **{checkpoint.EXTRA: ocp.args.JsonRestore()}))
  finally:
    checkpoint.close(manager)
  return checkpoint.decode_json(restored[checkpoint.EXTRA])

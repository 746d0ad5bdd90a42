r"""Imports a medicaldiffusion (PyTorch Lightning) VQ-GAN checkpoint as a latentfm VQ-GAN workdir.

  python tools/import_medicaldiffusion.py CKPT WORKDIR [--data_dir DIR] [--shape 64]
  python -m experiments.flow --config experiments/configs/flow.py:default --workdir runs/fm \
      --config.vqgan_workdir=WORKDIR

CKPT is a `.ckpt` of medicaldiffusion's `vq_gan_3d.model.VQGAN` (the thesis' autoencoder came
from it), or a bare state dict with its key names: `encoder.conv_first.conv.weight`,
`encoder.conv_blocks.{i}.down.conv.*`, `encoder.conv_blocks.{i}.res.{norm1,conv1.conv,norm2,
conv2.conv}.*`, `encoder.final_block.0.*`, `pre_vq_conv.conv.*`, `post_vq_conv.conv.*`,
`decoder.final_block.0.*`, `decoder.conv_blocks.{i}.up.convt.*`,
`decoder.conv_blocks.{i}.res{1,2}.*`, `decoder.conv_last.conv.*` and the EMA codebook
`codebook.{embeddings,N,z_avg}`. Its discriminators and LPIPS network are not imported (the
workdir gets fresh discriminators). The layout is read from the checkpoint's hyper-parameters
(`cfg.model` or `args`) where they can be read as plain data, else from the weights' shapes
(isotropic downsampling: pass `--downsample` for another).

WORKDIR (new or empty) gets `config.json` (the `default` VQ-GAN config with the imported
layout), an Orbax checkpoint at the Lightning `global_step` (codebook included, marked
initialised), the data split and `geometry.json` of `--data_dir` (default: the embedded
cohort) preprocessed to `--shape`³. It appears only once complete; a missing, unexpected or
mis-shaped key is one line naming the key, exit 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from typing import Any

import numpy as np

# The workdir's config comes from experiments/configs, which lives beside the library in the
# source tree (it is not installed).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Parts of the Lightning module that the latentfm workdir does not take over.
IGNORED_PREFIXES = ("image_discriminator.", "video_discriminator.", "perceptual_model.")


class CheckpointError(ValueError):
  """An unusable checkpoint; the message names the file or the key."""


def read_checkpoint(path: str, trust_pickle: bool = False) -> tuple[dict, dict, int]:
  """(state dict of float32 numpy arrays, hyper-parameters, global step) of a checkpoint.

  Only tensors and plain containers are unpickled unless `trust_pickle` (a Lightning checkpoint
  saved with a Hydra config holds OmegaConf objects; unpickling those runs code from the file).
  """
  import pickle  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise CheckpointError(
      f"{path}: holds more than tensors and plain data ({why}); rerun with "
      "--trust_pickle if you trust the file"
    ) from None
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types
    raise CheckpointError(
      f"{path}: not a readable PyTorch checkpoint "
      f"({(str(e).strip() or type(e).__name__).splitlines()[0][:160]})"
    ) from None
  if not isinstance(obj, dict):
    raise CheckpointError(
      f"{path}: expected a Lightning checkpoint or a state dict, got {type(obj).__name__}"
    )
  state = obj.get("state_dict", obj)
  bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise CheckpointError(f"{path}: key {bad[0]!r} is not a tensor")
  arrays = {k: v.detach().cpu().float().numpy() for k, v in state.items()}
  return arrays, _hyper_parameters(obj.get("hyper_parameters", {})), int(obj.get("global_step", 0))


def _plain(value: Any) -> Any:
  """A config object (dict, Namespace, OmegaConf) as nested dicts."""
  if hasattr(value, "items"):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (str, bytes)):
    return value
  if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
    return [_plain(v) for v in value]
  if hasattr(value, "__dict__"):  # argparse.Namespace
    return {k: _plain(v) for k, v in vars(value).items()}
  return value


def _hyper_parameters(hp: Any) -> dict:
  """The model section: `cfg.model` (+ `cfg.dataset.image_channels`) or `args`."""
  hp = _plain(hp)
  if "cfg" in hp:
    model = dict(hp["cfg"].get("model", {}))
    model.setdefault("image_channels", hp["cfg"].get("dataset", {}).get("image_channels"))
    return model
  return dict(hp.get("args", hp))


def layout(
  state: dict, hp: dict, downsample: tuple[int, ...] | None, num_groups: int | None
) -> dict:
  """The latentfm model fields of the checkpoint: from its hyper-parameters, the weights'
  shapes and the command line (which wins)."""
  need = "encoder.conv_first.conv.weight"
  for key in (need, "pre_vq_conv.conv.weight", "codebook.embeddings"):
    if key not in state:
      raise CheckpointError(f"missing key {key!r}")
  for option, allowed in (("norm_type", "group"), ("padding_type", "replicate")):
    if hp.get(option, allowed) != allowed:
      raise CheckpointError(f"{option} {hp[option]!r}: only {allowed!r} has a latentfm equivalent")
  stages = len({m.group(1) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
  factors = downsample or tuple(hp.get("downsample") or (2**stages,) * 3)
  return {
    "n_hiddens": int(state[need].shape[0]),
    "image_channels": int(state[need].shape[1]),
    "embedding_dim": int(state["pre_vq_conv.conv.weight"].shape[0]),
    "n_codes": int(state["codebook.embeddings"].shape[0]),
    "downsample": tuple(int(f) for f in factors),
    "norm_groups": int(num_groups or hp.get("num_groups") or 32),
  }


def key_map(stages: int) -> dict[str, tuple[str, str]]:
  """medicaldiffusion module prefix -> (latentfm params path, kind) for every layer."""
  res = lambda prefix, path: {
    f"{prefix}.norm1": (f"{path}/norm1", "norm"),
    f"{prefix}.conv1.conv": (f"{path}/conv1", "conv"),
    f"{prefix}.norm2": (f"{path}/norm2", "norm"),
    f"{prefix}.conv2.conv": (f"{path}/conv2", "conv"),
  }
  out = {
    "encoder.conv_first.conv": ("encoder/conv_in", "conv"),
    "encoder.final_block.0": ("encoder/norm_out", "norm"),
    "pre_vq_conv.conv": ("pre_vq_conv", "conv"),
    "post_vq_conv.conv": ("post_vq_conv", "conv"),
    "decoder.final_block.0": ("decoder/norm_in", "norm"),
    "decoder.conv_last.conv": ("decoder/conv_out", "conv"),
  }
  for i in range(stages):
    out[f"encoder.conv_blocks.{i}.down.conv"] = (f"encoder/down_{i}", "conv")
    out.update(res(f"encoder.conv_blocks.{i}.res", f"encoder/res_{i}"))
    out[f"decoder.conv_blocks.{i}.up.convt"] = (f"decoder/up_{i}", "transposed")
    out.update(res(f"decoder.conv_blocks.{i}.res1", f"decoder/res_{i}_0"))
    out.update(res(f"decoder.conv_blocks.{i}.res2", f"decoder/res_{i}_1"))
  return out


# torch weight -> Flax kernel: Conv (out, in, *k) -> (*k, in, out); ConvTranspose (in, out, *k)
# -> (*k, in, out), the same scatter (`latentfm.nn.layers.conv_transpose`).
_KERNEL = {
  "conv": lambda w: np.moveaxis(w, (0, 1), (-1, -2)),
  "transposed": lambda w: np.moveaxis(w, (0, 1), (-2, -1)),
}
_LEAVES = {
  "conv": (("weight", "kernel"), ("bias", "bias")),
  "transposed": (("weight", "kernel"), ("bias", "bias")),
  "norm": (("weight", "scale"), ("bias", "bias")),
}
_CODEBOOK = {
  "codebook.embeddings": "embeddings",
  "codebook.N": "cluster_size",
  "codebook.z_avg": "embed_sum",
}


def convert(state: dict, params: dict, codebook: dict, stages: int) -> tuple[dict, dict]:
  """(params, codebook) of latentfm's VQGAN from a medicaldiffusion state dict.

  `params` and `codebook` are the freshly initialised trees (their shapes are checked).
  Raises `CheckpointError` naming the first missing, unexpected or mis-shaped key.
  """
  import flax  # pylint: disable=import-outside-toplevel

  flat = flax.traverse_util.flatten_dict(params, sep="/")
  out = {}
  expected = set(_CODEBOOK)
  for prefix, (path, kind) in key_map(stages).items():
    for torch_leaf, flax_leaf in _LEAVES[kind]:
      key, target = f"{prefix}.{torch_leaf}", f"{path}/{flax_leaf}"
      expected.add(key)
      if key not in state:
        raise CheckpointError(f"missing key {key!r}")
      value = state[key]
      if flax_leaf == "kernel":
        value = _KERNEL[kind](value)
      if value.shape != flat[target].shape:
        raise CheckpointError(
          f"key {key!r} has shape {state[key].shape}, which does not fit "
          f"latentfm's {target} of shape {flat[target].shape}"
        )
      out[target] = np.ascontiguousarray(value, np.float32)
  for key in state:
    if key not in expected and not key.startswith(IGNORED_PREFIXES):
      raise CheckpointError(f"unexpected key {key!r}")
  book = dict(codebook["quantizer"])
  for key, name in _CODEBOOK.items():
    if key not in state:
      raise CheckpointError(f"missing key {key!r}")
    if state[key].shape != book[name].shape:
      raise CheckpointError(
        f"key {key!r} has shape {state[key].shape}, expected {tuple(book[name].shape)}"
      )
    book[name] = state[key]
  book["initialized"] = np.array(True)
  return flax.traverse_util.unflatten_dict(out, sep="/"), {"quantizer": book}


def vqgan_config(fields: dict, shape: int, data_dir: str | None):
  """The `default` VQ-GAN config with the imported layout and data."""
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel

  c = get_config("default")
  for name, value in fields.items():
    setattr(c.model, name, value)
  c.model.upsampler = "transposed"  # medicaldiffusion's decoder
  c.data.shape = (shape,) * 3
  c.data.dir = data_dir
  for s, f in zip(c.data.shape, c.model.downsample):
    if s % f:
      raise CheckpointError(f"--shape {shape} is not divisible by the downsampling {f}")
  return c


def write_workdir(
  workdir: str, config, params: dict, codebook: dict, step: int, source: str
) -> None:
  """Writes config, checkpoint, split and geometry into a new folder renamed to `workdir`."""
  # pylint: disable=import-outside-toplevel
  import jax

  from latentfm import atomic_write
  from latentfm.data import loader
  from latentfm.train import checkpoint, run_record, vqgan_step

  state = vqgan_step.create_state(jax.random.PRNGKey(config.seed), config)
  state = dict(
    state,
    params=jax.tree.map(jax.numpy.asarray, params),
    codebook=jax.tree.map(jax.numpy.asarray, codebook),
    step=jax.numpy.asarray(step, jax.numpy.int32),
    g_opt=vqgan_step.optimizers(config)[0].init(params),
  )
  with atomic_write.atomic_dir(workdir) as partial:
    run_record.record(partial, config, step, {}, note=f"imported from {source}")
    loader.load_splits(config.data, partial, config.seed, on_change=lambda line: None)
    manager = checkpoint.open_manager(os.path.join(partial, "ckpt"), async_save=False)
    try:
      checkpoint.save(manager, step, state, force=True)
    finally:
      checkpoint.close(manager)


def run(
  ckpt: str,
  workdir: str,
  *,
  shape: int = 64,
  data_dir: str | None = None,
  downsample: tuple[int, ...] | None = None,
  num_groups: int | None = None,
  trust_pickle: bool = False,
) -> str:
  """Imports `ckpt` into the new workdir `workdir`; returns a one-line summary."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from latentfm.nn.vqgan import VQGAN, stage_strides  # pylint: disable=import-outside-toplevel

  if os.path.isdir(workdir) and os.listdir(workdir):
    raise CheckpointError(f"{workdir} is not empty; the import writes only a new or empty folder")
  state, hp, step = read_checkpoint(ckpt, trust_pickle)
  config = vqgan_config(layout(state, hp, downsample, num_groups), shape, data_dir)
  model = VQGAN.from_config(config.model)
  x = jnp.zeros((1,) + tuple(config.data.shape) + (config.model.image_channels,))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  params, codebook = convert(
    state, variables["params"], variables["codebook"], len(stage_strides(config.model.downsample))
  )
  write_workdir(workdir, config, params, codebook, step, os.path.basename(ckpt))
  m = config.model
  return (
    f"import_medicaldiffusion: {workdir}: n_hiddens {m.n_hiddens}, downsample "
    f"{tuple(m.downsample)}, {m.n_codes} codes of {m.embedding_dim}, step {step}"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("ckpt", help="medicaldiffusion VQGAN .ckpt (or its state dict)")
  parser.add_argument("workdir", help="new or empty latentfm VQ-GAN workdir")
  parser.add_argument(
    "--shape",
    type=int,
    default=64,
    help="volume side the data is preprocessed to (the checkpoint's training resolution)",
  )
  parser.add_argument(
    "--data_dir", default=None, help="scans for the flow (default: the embedded cohort)"
  )
  parser.add_argument(
    "--downsample",
    type=int,
    nargs=3,
    default=None,
    help="per-axis downsampling (default: from the checkpoint)",
  )
  parser.add_argument(
    "--num_groups",
    type=int,
    default=None,
    help="GroupNorm groups (default: from the checkpoint, else 32)",
  )
  parser.add_argument(
    "--trust_pickle",
    action="store_true",
    help="unpickle objects beyond tensors (e.g. an OmegaConf config): runs code from the file",
  )
  args = parser.parse_args(argv)
  try:
    print(
      run(
        args.ckpt,
        args.workdir,
        shape=args.shape,
        data_dir=args.data_dir,
        downsample=tuple(args.downsample) if args.downsample else None,
        num_groups=args.num_groups,
        trust_pickle=args.trust_pickle,
      )
    )
  except (ValueError, OSError) as e:  # CheckpointError, and unusable data (VolumeError)
    print(f"import_medicaldiffusion: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Converts a PyTorch ``lpips.LPIPS(net='vgg')`` state dict to Flax params.

Usage: python tools/port_lpips.py SRC.pth DST.npz

SRC is ``torch.save(lpips.LPIPS(net='vgg').state_dict(), SRC)``. DST is an
uncompressed ``.npz`` of float32 arrays with flat names such as
``vgg/conv1_1/kernel`` and ``lin0/kernel``, readable without torch by
``latentfm.nn.lpips.load_params(DST)``. Conv kernels go from OIHW to HWIO.
Exits non-zero with a one-line error on unreadable input, missing or
unexpected keys, wrong shapes, or a scaling layer that differs from the
constants the Flax module uses.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys

import numpy as np

try:
  from latentfm.nn import lpips as flax_lpips
except ImportError:  # Run from a source checkout without installing.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from latentfm.nn import lpips as flax_lpips


class PortError(Exception):
  """Invalid input checkpoint."""


def key_map() -> dict[str, str]:
  """Torch state-dict key -> flat Flax name, for every LPIPS parameter."""
  mapping = {}
  idx = 0  # Index in torchvision's ``vgg16().features``.
  for b, block in enumerate(flax_lpips.VGG_BLOCKS):
    if b:
      idx += 1  # Max-pool.
    for c in range(len(block)):
      for torch_leaf, flax_leaf in (("weight", "kernel"), ("bias", "bias")):
        mapping[f"net.slice{b + 1}.{idx}.{torch_leaf}"] = f"vgg/conv{b + 1}_{c + 1}/{flax_leaf}"
      idx += 2  # Conv + ReLU.
  for i in range(len(flax_lpips.TAP_CHANNELS)):
    mapping[f"lin{i}.model.1.weight"] = f"lin{i}/kernel"
  return mapping


def _load_state_dict(src: str) -> dict[str, np.ndarray]:
  import torch  # Only the port tool needs torch.

  if not pathlib.Path(src).is_file():
    raise PortError(f"{src}: no such file")
  with open(src, "rb") as f:
    head = f.read(4)
  if head[:2] != b"PK" and head[:1] != b"\x80":  # torch zip or legacy pickle.
    raise PortError(f"{src}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
  try:
    obj = torch.load(src, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    lines = [ln.strip() for ln in str(e).splitlines()]
    why = next(
      (ln for ln in lines if ln.startswith("WeightsUnpickler")),
      lines[0] if lines else type(e).__name__,
    )
    why = why.removeprefix("WeightsUnpickler error: ").split(". ")[0]
    raise PortError(f"{src}: not a plain state_dict checkpoint ({why})") from None
  except Exception as e:  # torch raises many types for corrupt files.
    why = (str(e).strip().split(". ") or [type(e).__name__])[0]
    raise PortError(f"{src}: not a readable PyTorch checkpoint ({why})") from None
  if not isinstance(obj, dict) or not all(
    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
  ):
    raise PortError(f"{src}: expected a state_dict (str -> tensor), got {type(obj).__name__}")
  return {k: v.detach().cpu().float().numpy() for k, v in obj.items()}


def convert(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Validates an LPIPS-VGG torch state dict and returns flat Flax arrays."""
  mapping = key_map()
  shapes = flax_lpips.param_shapes()
  scaling = {"scaling_layer.shift": flax_lpips.SHIFT, "scaling_layer.scale": flax_lpips.SCALE}
  for key in list(mapping) + list(scaling):
    if key not in state:
      raise PortError(f"missing key {key!r}")
  duplicates = {
    f"lins.{i}.model.1.weight": f"lin{i}.model.1.weight"
    for i in range(len(flax_lpips.TAP_CHANNELS))
  }
  for key in state:
    if key not in mapping and key not in scaling and key not in duplicates:
      raise PortError(f"unexpected key {key!r}")
  for key, value in scaling.items():
    got = state[key]
    if got.shape != (1, 3, 1, 1):
      raise PortError(f"key {key!r} has shape {got.shape}, expected (1, 3, 1, 1)")
    if not np.allclose(got.ravel(), value, rtol=0, atol=1e-6):
      raise PortError(f"key {key!r} is {got.ravel().tolist()}, expected {list(value)}")
  for dup, key in duplicates.items():
    if dup in state and not np.array_equal(state[dup], state[key]):
      raise PortError(f"key {dup!r} differs from {key!r}")
  flat = {}
  for key, name in mapping.items():
    arr = state[key]
    if arr.ndim == 4:
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    if arr.shape != shapes[name]:
      torch_shape = shapes[name]
      if len(torch_shape) == 4:
        h, w, i, o = torch_shape
        torch_shape = (o, i, h, w)
      raise PortError(f"key {key!r} has shape {state[key].shape}, expected {torch_shape}")
    flat[name] = np.ascontiguousarray(arr, dtype=np.float32)
  return flat


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description="Convert an lpips.LPIPS(net='vgg') state_dict to a Flax "
    ".npz for latentfm.nn.lpips.load_params."
  )
  parser.add_argument("src", help="torch.save'd state_dict (.pth)")
  parser.add_argument("dst", help="output .npz path (written as given)")
  args = parser.parse_args(argv)
  try:
    flat = convert(_load_state_dict(args.src))
  except PortError as e:
    print(f"port_lpips: error: {e}", file=sys.stderr)
    return 1
  dst = pathlib.Path(args.dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with open(dst, "wb") as f:  # A file object keeps numpy from adding '.npz'.
    np.savez(f, **flat)
  count = sum(a.size for a in flat.values())
  print(f"wrote {len(flat)} arrays ({count:,} parameters) to {dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

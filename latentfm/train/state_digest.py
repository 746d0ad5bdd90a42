"""A content digest of a train state, so that a restored checkpoint can be checked bit for bit.

Orbax stores arrays without checksums: a flipped or truncated array file restores as wrong
values or a long traceback. The digest covers every leaf's key path, dtype, shape and bytes, in
the tree's own order, so the same state always gives the same digest on any host.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def _host_leaves(state: Any) -> tuple[list[tuple[str, np.ndarray]], bool]:
  """(key path, host array) of every leaf, and whether each array was whole on this process."""
  out, whole = [], True
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      whole, leaf = False, leaf.addressable_data(0)
    out.append((jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))))
  return out, whole


def _all_finite(array: np.ndarray) -> bool:
  if array.dtype.name == "bfloat16":
    array = array.astype(np.float32)
  return not np.issubdtype(array.dtype, np.inexact) or bool(np.all(np.isfinite(array)))


def inspect(state: Any) -> tuple[str | None, list[str]]:
  """The state's content digest and the key paths of its leaves holding NaN or Inf.

  Args:
    state: a pytree of arrays (any shapes and dtypes).

  Returns:
    `(digest, nonfinite)`: `digest` is a 32-character hex string, equal for two states exactly
    when their key paths, dtypes, shapes and bytes are equal (up to hash collisions), or None
    when some array is split across processes (each would see other bytes); `nonfinite` lists
    the floating-point leaves with a NaN or Inf, in tree order.
  """
  leaves, whole = _host_leaves(state)
  h = hashlib.blake2b(digest_size=16)
  nonfinite = []
  for name, array in leaves:
    h.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    if not _all_finite(array):
      nonfinite.append(name)
  return (h.hexdigest() if whole else None), nonfinite

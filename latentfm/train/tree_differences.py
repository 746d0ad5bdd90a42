"""Key-path and shape differences between a checkpoint's saved tree and a target state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def tree_differences(saved: Any, target: Any) -> list[str]:
  """Human-readable differences between checkpoint metadata and a target.

  Both trees are flattened the way Orbax serialises them (tuples and
  namedtuples become lists/dicts, empty nodes dropped) and compared by key
  path and shape, shallowest paths first.
  """
  saved_flat = ocp.tree.to_flat_dict(saved)
  target_flat = ocp.tree.to_flat_dict(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  diffs = []
  # Shallow paths first, so parameters are named before optimizer mirrors.
  for key in sorted(set(saved_flat) | set(target_flat), key=lambda k: (len(k), k)):
    name = "/".join(map(str, key))
    if key not in target_flat:
      diffs.append(
        f"{name} is in the checkpoint (shape {_shape(saved_flat[key])}) but not in the target"
      )
    elif key not in saved_flat:
      diffs.append(
        f"{name} is in the target (shape {_shape(target_flat[key])}) but not in the checkpoint"
      )
    elif _shape(saved_flat[key]) != _shape(target_flat[key]):
      diffs.append(
        f"{name} has shape {_shape(saved_flat[key])} in the "
        f"checkpoint but {_shape(target_flat[key])} in the target"
      )
  return diffs

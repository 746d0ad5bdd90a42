"""JSON-safe copies of small pytrees (data-iterator states, checkpoint extras); bytes survive."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_BYTES_TAG = "__bytes__"


def encode_json(value: Any) -> Any:
  """Makes `value` JSON-serialisable; bytes become `{"__bytes__": base64}`.

  Numpy scalars and arrays become Python numbers and (nested) lists; tuples
  become lists.
  """
  if isinstance(value, (bytes, bytearray)):
    return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise TypeError(f"JSON object keys must be str, got {k!r}.")
      out[k] = encode_json(v)
    return out
  if isinstance(value, (list, tuple)):
    return [encode_json(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(value).tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"Cannot store {type(value).__name__} as JSON: {value!r}.")


def decode_json(value: Any) -> Any:
  """Inverse of `encode_json` (bytes are restored; lists stay lists)."""
  if isinstance(value, dict):
    if set(value) == {_BYTES_TAG}:
      return base64.b64decode(value[_BYTES_TAG])
    return {k: decode_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [decode_json(v) for v in value]
  return value

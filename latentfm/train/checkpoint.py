"""Orbax checkpoints shared by both training stages.

A checkpoint step `<directory>/<step>/` holds three named items:

- `state`: the train-state pytree (`StandardSave`, sharded arrays supported).
- `data`: the data-iterator state of *each process*, as JSON in
  `data/process_<i>-of-<n>.json` (grain's naming). Bytes (e.g. grain's
  `DataLoaderIterator.get_state()`) are stored base64-encoded and come back as
  bytes.
- `extra`: a JSON dict written once (latent normalisation stats, config, ...).

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames
it to `<step>` only once every item (and every process) has finished, so a
crash mid-save leaves at most a tmp directory. `latest_step` and `restore`
never see such a directory, and `open_manager` removes stale ones.

Typical use in a training loop (`step` = number of finished updates)::

  manager = open_manager(workdir / "ckpt", keep=3, save_interval_steps=1000)
  if latest_step(manager) is not None:
    state, data_state, extra = restore(manager, state)  # state: fresh init
    if data_state is not None:
      data_iter.set_state(data_state)
  for step in range(latest_step(manager) or 0, num_steps):
    state = train_step(state, next(data_iter))
    save(manager, step + 1, state, data_state=data_iter.get_state(),
         extra=extra)
  save(manager, num_steps, state, data_state=data_iter.get_state(),
       extra=extra, force=True)  # skipped if already saved
  close(manager)  # waits for the last async save
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"
EXTRA = "extra"
_ITEMS = (STATE, DATA, EXTRA)
_BYTES_TAG = "__bytes__"
_MAX_LISTED = 5


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree differs from the target state (shapes or keys)."""


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


def _data_filename() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  every_process = ocp.options.MultiprocessingOptions(primary_host=None)
  return {
      STATE: ocp.StandardCheckpointHandler(),
      DATA: ocp.JsonCheckpointHandler(
          _data_filename(), multiprocessing_options=every_process),
      EXTRA: ocp.JsonCheckpointHandler("extra.json"),
  }


def open_manager(
    directory: str | os.PathLike[str],
    keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
) -> ocp.CheckpointManager:
  """Opens (or creates) the checkpoint directory.

  Args:
    directory: where step directories live; created if missing. Local paths
      are made absolute; remote (`gs://...`) paths are passed through.
    keep: number of most recent steps to keep; None keeps all.
    save_interval_steps: `save` writes only steps that are multiples of this
      (unless `force=True`).
    async_save: write in a background thread; `save` returns once the arrays
      are copied to host memory.

  Returns:
    An `orbax.checkpoint.CheckpointManager` for `save`/`restore`.
  """
  path = epath.Path(directory)
  if "://" not in os.fspath(directory):
    path = epath.Path(os.path.abspath(os.fspath(directory)))
  if keep is not None and keep < 1:
    raise ValueError(f"keep must be >= 1 or None, got {keep}.")
  if save_interval_steps < 1:
    raise ValueError(
        f"save_interval_steps must be >= 1, got {save_interval_steps}.")
  policies = ocp.checkpoint_managers
  keep_policy = (policies.PreserveAll() if keep is None
                 else policies.LatestN(n=keep))
  # Orbax's default policy also saves the first step of a fresh run; we only
  # save on the interval (and when JAX's preemption notice asks for it).
  decision = policies.AnySavePolicy([
      policies.FixedIntervalPolicy(save_interval_steps),
      policies.PreemptionCheckpointingPolicy(),
  ])
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      save_decision_policy=decision,
      preservation_policy=keep_policy,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
  )
  return ocp.CheckpointManager(
      path, item_names=_ITEMS, item_handlers=_item_handlers(), options=options)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """Latest saved step, or None.

  Read from disk when the manager opens, where interrupted (tmp) saves are
  never listed; afterwards a step counts as soon as this manager starts it.
  """
  return manager.latest_step()


def all_steps(manager: ocp.CheckpointManager) -> list[int]:
  """All saved steps, ascending."""
  return sorted(manager.all_steps())


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending async saves are on disk; re-raises their errors."""
  manager.wait_until_finished()


def close(manager: ocp.CheckpointManager) -> None:
  """Waits for pending saves and releases the manager's resources."""
  manager.wait_until_finished()
  manager.close()


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    data_state: Mapping[str, Any] | bytes | None = None,
    extra: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
  """Saves `state`, this process's `data_state` and `extra` at `step`.

  Call on every process with the same `step`, `state` and `extra`. Steps that
  are not a multiple of `save_interval_steps`, or not newer than the latest
  checkpoint, are skipped unless `force`; a step already on disk is always
  skipped. With async saving this returns once arrays are copied to host
  memory, so the caller may donate/overwrite `state` right after; the files
  are written in the background (a next `save` first waits for the previous
  one). Call `wait` or `close` before reading the files or exiting.

  Returns:
    True if a save was started.
  """
  step = int(step)
  if step in manager.all_steps():
    return False
  args = ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA: ocp.args.JsonSave(encode_json(data_state)),
      EXTRA: ocp.args.JsonSave(encode_json(dict(extra or {}))),
  })
  return manager.save(step, args=args, force=force)


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def tree_differences(saved: Any, target: Any) -> list[str]:
  """Human-readable differences between checkpoint metadata and a target.

  Both trees are flattened the way Orbax serialises them (tuples and
  namedtuples become lists/dicts, empty nodes dropped) and compared by key
  path and shape, shallowest paths first.
  """
  saved_flat = ocp.tree.to_flat_dict(saved)
  target_flat = ocp.tree.to_flat_dict(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  diffs = []
  # Shallow paths first, so parameters are named before optimizer mirrors.
  for key in sorted(set(saved_flat) | set(target_flat),
                    key=lambda k: (len(k), k)):
    name = "/".join(map(str, key))
    if key not in target_flat:
      diffs.append(f"{name} is in the checkpoint (shape "
                   f"{_shape(saved_flat[key])}) but not in the target")
    elif key not in saved_flat:
      diffs.append(f"{name} is in the target (shape "
                   f"{_shape(target_flat[key])}) but not in the checkpoint")
    elif _shape(saved_flat[key]) != _shape(target_flat[key]):
      diffs.append(f"{name} has shape {_shape(saved_flat[key])} in the "
                   f"checkpoint but {_shape(target_flat[key])} in the target")
  return diffs


def check_compatible(
    manager: ocp.CheckpointManager, step: int, target_state: Any
) -> None:
  """Raises `CheckpointMismatchError` if `step` cannot restore into target."""
  metadata = manager.item_metadata(step)[STATE]
  if metadata is None:
    raise CheckpointMismatchError(
        f"Checkpoint step {step} in {manager.directory} has no readable "
        f"'{STATE}' item.")
  saved = getattr(metadata, "tree", metadata)
  diffs = tree_differences(saved, target_state)
  if diffs:
    more = len(diffs) - _MAX_LISTED
    listed = "; ".join(diffs[:_MAX_LISTED])
    suffix = f"; and {more} more difference(s)" if more > 0 else ""
    raise CheckpointMismatchError(
        f"Checkpoint step {step} in {manager.directory} does not match the "
        f"target state (was it written with another config?): {listed}"
        f"{suffix}.")


def restore(
    manager: ocp.CheckpointManager,
    target_state: Any,
    step: int | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
  """Restores `(state, data_state, extra)` from `step` (default: latest).

  The state comes back with the structure, dtypes and shardings of
  `target_state` (arrays or `jax.ShapeDtypeStruct`s); a differing dtype is
  cast, not an error. Shapes and tree paths are checked against the
  checkpoint first; nothing on disk is modified.
  `data_state` is None if it was saved as None or if this process has no
  entry (e.g. the process count changed).

  Raises:
    FileNotFoundError: if there is no checkpoint (at `step`).
    CheckpointMismatchError: if shapes or keys differ from `target_state`.
  """
  manager.wait_until_finished()  # a step being written is not readable yet
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
  step = int(step)
  if step not in manager.all_steps():
    raise FileNotFoundError(
        f"No checkpoint for step {step} in {manager.directory}; available: "
        f"{all_steps(manager)}.")
  check_compatible(manager, step, target_state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract),
      EXTRA: ocp.args.JsonRestore(),
  }))
  return restored[STATE], _restore_data(manager, step), decode_json(
      restored[EXTRA])


def _restore_data(manager: ocp.CheckpointManager, step: int) -> Any:
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))
  except FileNotFoundError:
    _log.warning(
        "Checkpoint step %d has no data-iterator state for %s; the data "
        "pipeline starts afresh.", step, _data_filename())
    return None
  return decode_json(restored[DATA])

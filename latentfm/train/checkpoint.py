"""Orbax checkpoints shared by both training stages.

A checkpoint step `<directory>/<step>/` holds three named items:

- `state`: the train-state pytree (`StandardSave`, sharded arrays supported).
- `data`: the data-iterator state of *each process*, as JSON in
  `data/process_<i>-of-<n>.json` (grain's naming). Bytes (e.g. grain's
  `DataLoaderIterator.get_state()`) are stored base64-encoded and come back as
  bytes.
- `extra`: a JSON dict written once (latent normalisation stats, config, ...), plus the
  content digest of `state` (`state_digest.inspect`) under a reserved key.

Verification: `save` refuses a state holding NaN/Inf, so every checkpoint on disk is a finite
state, and `restore` recomputes the digest of what it read: a flipped or truncated array file
raises `CorruptCheckpointError` (one line) instead of restoring wrong values.
`restore_newest_good` then falls back to the newest checkpoint that verifies, moving each bad
one aside to `<directory>/corrupt-<step>` (kept, never deleted).

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

from collections.abc import Mapping
import logging
import os
import time
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from latentfm.train import state_digest
from latentfm.train.json_tree import decode_json, encode_json
from latentfm.train.tree_differences import tree_differences

_log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"
EXTRA = "extra"
_ITEMS = (STATE, DATA, EXTRA)
_MAX_LISTED = 5
DIGEST_KEY = "__state_digest__"


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree differs from the target state (shapes or keys)."""


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read, or what was read differs from what was saved."""


class NonFiniteStateError(FloatingPointError):
  """A state holding NaN/Inf was about to be saved; the message names the step and leaves."""


def _data_filename() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  every_process = ocp.options.MultiprocessingOptions(primary_host=None)
  return {
    STATE: ocp.StandardCheckpointHandler(),
    DATA: ocp.JsonCheckpointHandler(_data_filename(), multiprocessing_options=every_process),
    EXTRA: ocp.JsonCheckpointHandler("extra.json"),
  }


def open_manager(
  directory: str | os.PathLike[str],
  keep: int | None = 3,
  save_interval_steps: int = 1,
  async_save: bool = True,
  keep_steps: tuple[int, ...] = (),
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
    keep_steps: steps kept whatever `keep` says (e.g. the last one before a
      recorded settings change).

  Returns:
    An `orbax.checkpoint.CheckpointManager` for `save`/`restore`.
  """
  path = epath.Path(directory)
  if "://" not in os.fspath(directory):
    path = epath.Path(os.path.abspath(os.fspath(directory)))
  if keep is not None and keep < 1:
    raise ValueError(f"keep must be >= 1 or None, got {keep}.")
  if save_interval_steps < 1:
    raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
  policies = ocp.checkpoint_managers
  keep_policy = policies.PreserveAll() if keep is None else policies.LatestN(n=keep)
  if keep_steps and keep is not None:
    keep_policy = policies.AnyPreservationPolicy(
      [keep_policy, policies.CustomSteps(steps=sorted(set(keep_steps)))]
    )
  # Orbax's default policy also saves the first step of a fresh run; we only
  # save on the interval (and when JAX's preemption notice asks for it).
  decision = policies.AnySavePolicy(
    [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
  )
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=save_interval_steps,
    save_decision_policy=decision,
    preservation_policy=keep_policy,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
    create=True,
  )
  return ocp.CheckpointManager(
    path, item_names=_ITEMS, item_handlers=_item_handlers(), options=options
  )


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

  Raises:
    NonFiniteStateError: `state` holds NaN/Inf (nothing is written).
  """
  step = int(step)
  if step in manager.all_steps():
    return False
  if not (force or manager.should_save(step)):
    return False
  digest, nonfinite = state_digest.inspect(state)
  if nonfinite:
    more = f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else ""
    raise NonFiniteStateError(
      f"step {step}: the state holds NaN/Inf in {', '.join(nonfinite[:3])}{more}; not "
      "saved, stopping with the last good checkpoint kept"
    )
  args = ocp.args.Composite(
    **{
      STATE: ocp.args.StandardSave(state),
      DATA: ocp.args.JsonSave(encode_json(data_state)),
      EXTRA: ocp.args.JsonSave(encode_json(dict(extra or {}, **{DIGEST_KEY: digest}))),
    }
  )
  return manager.save(step, args=args, force=force)


def check_compatible(manager: ocp.CheckpointManager, step: int, target_state: Any) -> None:
  """Raises `CheckpointMismatchError` if `step` cannot restore into target."""
  metadata = manager.item_metadata(step)[STATE]
  if metadata is None:
    raise CheckpointMismatchError(
      f"Checkpoint step {step} in {manager.directory} has no readable '{STATE}' item."
    )
  saved = getattr(metadata, "tree", metadata)
  diffs = tree_differences(saved, target_state)
  if diffs:
    more = len(diffs) - _MAX_LISTED
    listed = "; ".join(diffs[:_MAX_LISTED])
    suffix = f"; and {more} more difference(s)" if more > 0 else ""
    raise CheckpointMismatchError(
      f"Checkpoint step {step} in {manager.directory} does not match the "
      f"target state (was it written with another config?): {listed}"
      f"{suffix}."
    )


def restore(
  manager: ocp.CheckpointManager, target_state: Any, step: int | None = None
) -> tuple[Any, Any, dict[str, Any]]:
  """Restores `(state, data_state, extra)` from `step` (default: latest).

  The state comes back with the structure, dtypes and shardings of
  `target_state` (arrays or `jax.ShapeDtypeStruct`s); a differing dtype is
  cast, not an error. Shapes and tree paths are checked against the
  checkpoint first, and the restored content against the digest saved with
  it; nothing on disk is modified.
  `data_state` is None if it was saved as None or if this process has no
  entry (e.g. the process count changed).

  Raises:
    FileNotFoundError: if there is no checkpoint (at `step`).
    CheckpointMismatchError: if shapes or keys differ from `target_state`.
    CorruptCheckpointError: if the checkpoint is unreadable or its content
      differs from the digest saved with it.
  """
  manager.wait_until_finished()  # a step being written is not readable yet
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
  step = int(step)
  if step not in manager.all_steps():
    raise FileNotFoundError(
      f"No checkpoint for step {step} in {manager.directory}; available: {all_steps(manager)}."
    )
  try:
    check_compatible(manager, step, target_state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract), EXTRA: ocp.args.JsonRestore()}
      ),
    )
    extra = decode_json(restored[EXTRA])
    data_state = _restore_data(manager, step)
  except CheckpointMismatchError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # tensorstore/orbax/json errors
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = first.split(" See full TensorStore details")[0][:200]
    raise CorruptCheckpointError(
      f"checkpoint step {step} in {manager.directory} is unreadable ({type(e).__name__}: {first})"
    ) from None
  saved = extra.pop(DIGEST_KEY, None)
  if saved is not None:
    found, _ = state_digest.inspect(restored[STATE])
    if found is not None and found != saved:
      raise CorruptCheckpointError(
        f"checkpoint step {step} in {manager.directory} is corrupt (its "
        "arrays differ from the digest saved with them)"
      )
  return restored[STATE], data_state, extra


def restore_newest_good(
  manager: ocp.CheckpointManager, target_state: Any, *, report=_log.warning, set_aside: bool = True
) -> tuple[Any, Any, dict[str, Any], int]:
  """Restores the newest checkpoint that verifies, newest first.

  Args:
    manager: from `open_manager`.
    target_state: as for `restore`.
    report: called with one line per bad checkpoint skipped.
    set_aside: move each bad checkpoint to `<directory>/corrupt-<step>` (so
      that training can save that step again and keep-N rotation ignores
      it); False leaves the directory untouched (read-only users).

  Returns:
    `(state, data_state, extra, step)`.

  Raises:
    FileNotFoundError: there is no checkpoint at all.
    CorruptCheckpointError: no checkpoint verifies (the line lists them).
    CheckpointMismatchError: the newest readable checkpoint has another tree.
  """
  manager.wait_until_finished()
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
  bad = []
  for step in steps:
    try:
      state, data_state, extra = restore(manager, target_state, step)
    except CorruptCheckpointError as e:
      bad.append(step)
      moved = _set_aside(manager, step) if set_aside else None
      report(f"{e}; " + (f"moved to {moved}, " if moved else "") + "trying the one before")
      continue
    if bad and set_aside:
      manager.reload()
    return state, data_state, extra, step
  if set_aside:
    manager.reload()
  raise CorruptCheckpointError(
    f"no readable checkpoint in {manager.directory} (steps {bad} are corrupt)"
  )


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str | None:
  if jax.process_index() != 0:
    return None
  source = os.path.join(os.fspath(manager.directory), str(step))
  target = os.path.join(os.fspath(manager.directory), f"corrupt-{step}")
  if os.path.exists(target):
    target = f"{target}-{time.strftime('%Y%m%d-%H%M%S')}"
  try:
    os.rename(source, target)
  except OSError:
    return None
  return target


def read_extra(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON `extra` item of `step` alone (without the state digest)."""
  restored = manager.restore(step, args=ocp.args.Composite(**{EXTRA: ocp.args.JsonRestore()}))
  extra = decode_json(restored[EXTRA])
  extra.pop(DIGEST_KEY, None)
  return extra


def _restore_data(manager: ocp.CheckpointManager, step: int) -> Any:
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))
  except FileNotFoundError:
    _log.warning(
      "Checkpoint step %d has no data-iterator state for %s; the data pipeline starts afresh.",
      step,
      _data_filename(),
    )
    return None
  return decode_json(restored[DATA])

"""What a workdir remembers about how it was trained: `config.json` and `config_history.jsonl`.

A resume with other settings than the workdir's would silently continue a different experiment
under the old record, so it is refused, naming the changed keys, unless `train.allow_changes`
is set; then the change is appended to `config_history.jsonl` with the step it took effect,
and `config.json` becomes the new settings (the earlier ones stay in the history). Settings
that only say how long to run or how often to log, evaluate, sample and save change freely.

Paths in the config (`PATH_KEYS`) are stored relative to the workdir, so a workdir can be used
from any directory and moved together with the folders it names.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping

import ml_collections

from latentfm import atomic_write

CONFIG = "config.json"
HISTORY = "config_history.jsonl"
# Keys that do not change what is trained: run length, logging, evaluation, previews, saving.
FREE_KEYS = (
  "train.num_steps",
  "train.log_every",
  "train.eval_every",
  "train.image_every",
  "train.sample_every",
  "train.ckpt_every",
  "train.keep_checkpoints",
  "train.eval_volumes",
  "train.tensorboard",
  "train.reuse_host_memory",
  "train.allow_changes",
  "data.worker_count",
  "data.skip_bad_files",
)
FREE_PREFIXES = ("sample.",)
PATH_KEYS = ("vqgan_workdir", "data.dir")


class SettingsChangedError(ValueError):
  """A resume asked for other settings than the workdir was trained with."""


def to_plain(config: ml_collections.ConfigDict | Mapping) -> dict:
  """The config as the plain JSON dict that `config.json` holds (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} for every leaf of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _with_paths(plain: dict, convert) -> dict:
  out = json.loads(json.dumps(plain))
  for key in PATH_KEYS:
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
      node[leaf] = convert(node[leaf])
  return out


def resolve_paths(plain: dict, workdir: str) -> dict:
  """Makes the path keys of a stored config absolute; a relative one is read against `workdir`
  unless only the current directory holds it (configs stored before paths were relative)."""

  def resolve(path):
    if os.path.isabs(path):
      return path
    beside = os.path.normpath(os.path.join(os.path.abspath(workdir), path))
    return beside if os.path.exists(beside) or not os.path.exists(path) else os.path.abspath(path)

  return _with_paths(plain, resolve)


def stored_form(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The plain config with its path keys made relative to `workdir`."""
  base = os.path.abspath(workdir)
  return _with_paths(to_plain(config), lambda p: os.path.relpath(os.path.abspath(p), base))


def is_free(key: str) -> bool:
  """Whether a setting may change on resume without `train.allow_changes`."""
  return key in FREE_KEYS or key.startswith(FREE_PREFIXES)


def changed_keys(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, current value)} for every setting that differs.

  Both are plain dicts with absolute paths. Keys present on one side only (options added to
  the code since) are not changes.
  """
  a, b = flatten(saved), flatten(current)
  return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]}


def load_saved(workdir: str) -> dict | None:
  """The stored config of `workdir` with absolute paths, or None for a new workdir."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return resolve_paths(json.load(f), workdir)


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """The settings `config` changes against `workdir`'s record (empty for a new workdir).

  Returns:
    {key: (saved, current)} for every difference, free settings included.

  Raises:
    SettingsChangedError: a setting that is not free changed, and `config.train.allow_changes`
      is not set.
  """
  saved = load_saved(workdir)
  if saved is None:
    return {}
  current = _with_paths(to_plain(config), os.path.abspath)
  changes = changed_keys(saved, current)
  guarded = {k: v for k, v in changes.items() if not is_free(k)}
  if guarded and not config.train.get("allow_changes", False):
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in guarded.items())
    raise SettingsChangedError(
      f"{workdir} was trained with other settings ({listed}); rerun with the same settings, "
      "or add --config.train.allow_changes=true to continue with the new ones (recorded in "
      f"{HISTORY})"
    )
  return changes


def record(
  workdir: str,
  config: ml_collections.ConfigDict,
  step: int,
  changes: Mapping[str, tuple[Any, Any]],
  note: str | None = None,
) -> None:
  """Writes `config.json` and appends to the history: the first settings at step 0, then each
  accepted change with the step from which it applies."""
  new = not os.path.isfile(os.path.join(workdir, CONFIG))
  if not (new or changes or note):
    return
  stored = stored_form(config, workdir)
  entry = {
    "step": int(step),
    "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }
  if changes:
    entry["changes"] = {k: [old, new_value] for k, (old, new_value) in changes.items()}
  if note:
    entry["note"] = note
  entry["config"] = stored
  with open(os.path.join(workdir, HISTORY), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry) + "\n")
  atomic_write.write_text(os.path.join(workdir, CONFIG), json.dumps(stored, indent=2))


def change_steps(workdir: str) -> tuple[int, ...]:
  """The steps at which recorded changes took effect (their checkpoints are kept)."""
  path = os.path.join(workdir, HISTORY)
  if not os.path.isfile(path):
    return ()
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return tuple(
    r["step"] for r in rows if r["step"] > 0 and any(not is_free(k) for k in r.get("changes", {}))
  )

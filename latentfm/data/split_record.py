"""The train/validation split a workdir was trained with, kept stable when the data changes.

`train_val_split` draws the split from the number of files, so adding one scan would reshuffle
every assignment and move validation scans into training. The first run of a stage records
which file went where (`data_split.json`); later runs keep each recorded file on its side,
split only the files added since (by the same rule), and drop removed ones.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from latentfm import atomic_write
from latentfm.data.preprocess import train_val_split

RECORD = "data_split.json"


def read(workdir: str) -> dict | None:
  """The recorded split {"train": [names], "val": [names]}, or None."""
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write(workdir: str, names: Sequence[str], train: np.ndarray, val: np.ndarray) -> None:
  """Records which of `names` went to training and which to validation."""
  record = {"train": [names[i] for i in train], "val": [names[i] for i in val]}
  atomic_write.write_text(os.path.join(workdir, RECORD), json.dumps(record, indent=1))


def assign(
  names: Sequence[str], val_fraction: float, split_seed: int, record: dict | None
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """Sorted train and validation indices into `names`, the added and the removed names.

  Args:
    names: the data set's file names, in index order.
    val_fraction, split_seed: `train_val_split`'s rule, for a new workdir and added files.
    record: `read(workdir)`, or None for a new workdir.

  Returns:
    `(train, val, added, removed)`; without a record or a change, `(train, val)` is exactly
    `train_val_split(len(names), val_fraction, split_seed)`.
  """
  if record is None:
    train, val = train_val_split(len(names), val_fraction, split_seed)
    return train, val, [], []
  old_train, old_val = set(record["train"]), set(record["val"])
  known = old_train | old_val
  added = [i for i, n in enumerate(names) if n not in known]
  removed = sorted(known - set(names))
  train = [i for i, n in enumerate(names) if n in old_train]
  val = [i for i, n in enumerate(names) if n in old_val]
  if len(added) >= 2:
    new_train, new_val = train_val_split(len(added), val_fraction, split_seed)
    train += [added[j] for j in new_train]
    val += [added[j] for j in new_val]
  else:
    train += added
  if not val or not train:
    raise ValueError(
      f"the data leaves no {'validation' if not val else 'training'} scans "
      f"from the recorded split ({len(removed)} removed)"
    )
  return np.sort(train), np.sort(val), [names[i] for i in added], removed


def describe(directory: str, added: Sequence[str], removed: Sequence[str]) -> str:
  """One line saying how `directory` changed."""

  def some(items):
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

  parts = [f"{len(added)} added ({some(added)})"] if added else []
  parts += [f"{len(removed)} removed ({some(removed)})"] if removed else []
  return f"{directory} changed since this workdir was trained: {'; '.join(parts)}"

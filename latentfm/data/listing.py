"""The volumes of a data directory and their labels: every volume file, or a manifest's rows.

A directory with a `manifest.csv` (a `file` column and optionally `stage` or `label`) lists its
volumes and their integer classes; without one, every volume file in it is taken, unlabelled.
"""

from __future__ import annotations

import csv
import os

from latentfm.data.io import ManyErrors, VolumeError, is_volume_file

UNLABELLED = -1  # the label of a volume with no class


def _manifest_items(directory: str, manifest: str) -> tuple[list[tuple[str, int]], list[str]]:
  """(path, label) of every manifest row, and one problem line per listed file that is missing.

  The header may carry a UTF-8 BOM, spaces and any case; the same file listed twice (even as
  `./x` and `x`) is refused with both line numbers, since it could land in both splits.
  """
  with open(manifest, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f))
  header = [h.strip().lower() for h in rows[0]] if rows else []
  if "file" not in header or len(rows) < 2:
    raise VolumeError(
      f"{manifest}: expected a header with a 'file' column and at least one row "
      f"(found columns {header})"
    )
  column = {name: header.index(name) for name in ("file", "stage", "label") if name in header}
  label_column = column.get("stage", column.get("label"))
  items, missing, seen = [], [], {}
  for line, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    cells = [cell.strip() for cell in row] + [""] * len(header)
    name = cells[column["file"]]
    key = os.path.normpath(name)
    if key in seen:
      raise VolumeError(f"{manifest} line {line}: {name!r} is already listed on line {seen[key]}")
    seen[key] = line
    text = cells[label_column] if label_column is not None else ""
    try:
      label = int(text) if text else UNLABELLED
    except ValueError:
      raise VolumeError(
        f"{manifest} line {line}: label {text!r} of {name!r} is not an integer"
      ) from None
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      missing.append(f"{path}: listed on line {line} of {manifest}, but no such file")
    items.append((path, label))
  return items, missing


def _index(directory: str) -> tuple[list[tuple[str, int]], list[str]]:
  if not os.path.isdir(directory):
    raise VolumeError(f"{directory}: data directory does not exist")
  manifest = os.path.join(directory, "manifest.csv")
  if os.path.isfile(manifest):
    return _manifest_items(directory, manifest)
  names = sorted(n for n in os.listdir(directory) if is_volume_file(n) and not n.startswith("."))
  if not names:
    raise VolumeError(f"{directory}: no volume files (.nii, .nii.gz, .mha, .mhd, .nrrd) found")
  return [(os.path.join(directory, n), UNLABELLED) for n in names], []


def index_directory(directory: str) -> list[tuple[str, int]]:
  """(path, label) of every volume in `directory`; labels come from `manifest.csv` if present.

  Raises:
    VolumeError: no usable listing; `ManyErrors` names every listed file that is missing.
  """
  items, missing = _index(directory)
  if missing:
    raise ManyErrors(
      f"{len(missing)} file(s) listed in {directory}/manifest.csv are missing:", missing
    )
  return items

"""Write-then-rename for every file and folder the library writes.

A file is written under a hidden temporary name in its own folder and renamed over the target
only when complete, so an interrupted run leaves the previous version (or nothing) in place,
never half a file that blocks or misleads the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path next to `path` (same suffix); renamed to `path` if the block ends
  without an exception, removed otherwise.

  Args:
    path: the final file path; its folder is created if missing.

  Yields:
    The temporary path to write (e.g. to hand to SimpleITK or `np.savez`, which pick the
    format from the suffix).
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".partial-{os.getpid()}-{name}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a fresh temporary folder next to `path`; renamed to `path` (which must be missing
  or empty) if the block succeeds, removed with its contents otherwise."""
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".partial-{name}-", dir=parent)
  try:
    yield tmp
    if os.path.isdir(path):
      os.rmdir(path)  # only an empty folder; anything else raises and is kept
    os.rename(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def next_free_dir(base: str | os.PathLike) -> str:
  """`base` if it is missing or empty, else the first of `base_1`, `base_2`, ... that is."""
  base = os.fspath(base)
  candidate, n = base, 0
  while os.path.isdir(candidate) and os.listdir(candidate) or os.path.isfile(candidate):
    n += 1
    candidate = f"{base}_{n}"
  return candidate

"""One run per workdir: an advisory lock held while a training, sampling or evaluation run lives.

The lock is `fcntl.flock` on `<workdir>/.lock`, which the kernel releases when the holding
process dies, so a lock left by a killed run is stale by construction and the next run takes it
over. The file also names the holder (pid, host, start time, purpose) so that a refused run can
say who holds it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Iterator

LOCK_NAME = ".lock"


class WorkdirLockedError(ValueError):
  """Another live process holds the workdir; the message names it."""


def _holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
    return f"pid {info['pid']} on {info['host']} ({info['purpose']}, started {info['started']})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


@contextlib.contextmanager
def hold(workdir: str, purpose: str) -> Iterator[str]:
  """Holds the lock of `workdir` (created if missing) while the block runs.

  Args:
    workdir: the stage workdir.
    purpose: what the run does (e.g. "vqgan training"); shown to a refused run.

  Yields:
    The lock file's path.

  Raises:
    WorkdirLockedError: another live process holds the lock.
    OSError: the workdir cannot be created or written (e.g. read-only).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(
        f"{workdir} is in use by {_holder(path)}; wait for it to finish or stop it"
      ) from None
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "purpose": purpose,
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    yield path
  finally:
    os.close(fd)  # closing the descriptor releases the lock

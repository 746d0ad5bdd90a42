"""What the entry points share: flags, clean one-line errors, the workdir lock, file progress."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

from absl import flags
import ml_collections
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(default_config: str) -> None:
  config_flags.DEFINE_config_file(
    "config", default_config, "Python config file[:name].", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and config.")


def define_solver_flags() -> None:
  """--solver, --steps and --eta, shared by the commands that sample a trained flow."""
  flags.DEFINE_enum(
    "solver",
    None,
    ["euler", "heun", "midpoint", "tsit5", "dopri5", "ddpm", "ddim"],
    "Rectified flow: an ODE solver (default euler); DDPM: ddpm (ancestral, all "
    "steps; the default) or ddim.",
  )
  flags.DEFINE_integer(
    "steps", 50, "Fixed-step solvers and ddim: steps; adaptive: initial step 1/steps."
  )
  flags.DEFINE_float("eta", 0.0, "ddim: noise level (0 deterministic, 1 ancestral).")


def fail(message: str, code: int = 2) -> None:
  """One line on stderr and exit `code` (2 = bad input, no traceback)."""
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "latentfm"
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(code)


def parse_plain_flags(argv: list[str]) -> flags.FlagValues:
  """Parses absl flags; a bad flag or a stray positional argument is one line and exit 2."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  _refuse_positional(rest)
  show_library_warnings()
  return FLAGS


def show_library_warnings() -> None:
  """Prints the library's logged warnings (replaced NaN voxels, rounded directions, skipped
  files) as `warning: ...` lines on stderr; absl's handler would hide them below FATAL."""
  import logging  # pylint: disable=import-outside-toplevel

  import tqdm  # pylint: disable=import-outside-toplevel

  class AboveProgressBars(logging.Handler):
    def emit(self, record):
      tqdm.tqdm.write(self.format(record), file=sys.stderr)

  logger = logging.getLogger("latentfm")
  if not logger.handlers:
    handler = AboveProgressBars()
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _refuse_positional(rest: list[str]) -> None:
  if len(rest) > 1:
    fail(f"unexpected argument(s) {' '.join(rest[1:])!r}; every option is a --flag")


def check_writable(directory: str) -> None:
  """Raises OSError (one line through `run_guarded`) if files cannot be created in `directory`
  (made if missing), before any heavy work."""
  import errno  # pylint: disable=import-outside-toplevel

  os.makedirs(directory, exist_ok=True)
  if not os.access(directory, os.W_OK | os.X_OK):
    raise OSError(errno.EACCES, "not writable", directory)


def workdir_held(workdir: str, purpose: str):
  """The workdir lock (`latentfm.train.workdir_lock`) for a command that writes into it."""
  from latentfm.train import workdir_lock  # pylint: disable=import-outside-toplevel

  return workdir_lock.hold(workdir, purpose)


def parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
  """Parses `--config`, `--config.x=y` overrides and `--workdir`; bad flags exit 2."""
  try:
    rest = FLAGS(argv)
    config = FLAGS.config  # a config file that failed to load raises only here
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    missing = _missing_config_file(argv)
    fail(f"--config {missing}: no such file" if missing else _config_error_line(e))
  _refuse_positional(rest)
  show_library_warnings()
  missing = _missing_config_file(argv)
  if missing:  # ml_collections defers this error to the first use of the config
    fail(f"--config {missing}: no such file")
  if not FLAGS.workdir:
    fail("--workdir is required")
  return config, FLAGS.workdir


def _missing_config_file(argv: list[str]) -> str | None:
  """The `--config` file named in `argv` if it does not exist."""
  for i, arg in enumerate(argv):
    value = (
      argv[i + 1]
      if arg == "--config" and i + 1 < len(argv)
      else (arg.split("=", 1)[1] if arg.startswith("--config=") else None)
    )
    if value is not None and not os.path.isfile(value.split(":", 1)[0]):
      return value.split(":", 1)[0]
  return None


def _config_error_line(e: Exception) -> str:
  """The informative line of a flag or config-file error (ml_collections puts the cause of a
  failed config file after "Error whilst parsing config file:")."""
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  if lines[0].rstrip(":").endswith("Error whilst parsing config file") and len(lines) > 1:
    return f"{lines[0]} {lines[-1]}"
  return lines[0]


def run_guarded(fn: Callable[[], object]) -> None:
  """Runs `fn`, turning bad input (ValueError, unusable files or folders: read-only, full,
  symlink loops) into one line and exit 2, and a NaN/Inf stop into one line and exit 1.

  A `ManyErrors` (e.g. every unusable file of a data folder) keeps one line per item.
  """
  # pylint: disable=import-outside-toplevel
  from latentfm.data.io import ManyErrors

  try:
    fn()
  except FloatingPointError as e:  # NaN/Inf losses or states (the last good checkpoint is kept)
    fail(str(e), code=1)
  except ManyErrors as e:
    fail(str(e).strip())
  except (ValueError, ImportError) as e:
    fail(str(e).strip().splitlines()[0])
  except OSError as e:
    fail(_os_error_line(e))


def _os_error_line(e: OSError) -> str:
  """One line for an OS-level failure, naming the path and what to do where that is clear."""
  import errno  # pylint: disable=import-outside-toplevel

  where = e.filename or ""
  hints = {
    errno.ENOSPC: "the disk is full; free space and rerun (the last checkpoint is kept)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.ELOOP: "symbolic link loop",
  }
  reason = hints.get(e.errno, e.strerror or str(e).strip().splitlines()[0])
  return f"{where}: {reason}" if where else reason


def load_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def file_progress(desc: str, enabled: bool = True):
  import tqdm  # pylint: disable=import-outside-toplevel

  return lambda items: tqdm.tqdm(items, desc=desc, disable=not enabled, leave=False)

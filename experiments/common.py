"""What both training entry points share: flags, clean errors, progress bars, image previews."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags
import ml_collections

FLAGS = flags.FLAGS


def define_flags(default_config: str) -> None:
  config_flags.DEFINE_config_file("config", default_config, "Python config file[:name].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and config.")


def fail(message: str, code: int = 2) -> None:
  """One line on stderr and exit `code` (2 = bad input, no traceback)."""
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "latentfm"
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(code)


def parse_plain_flags(argv: list[str]) -> flags.FlagValues:
  """Parses absl flags; a bad flag is one line on stderr and exit 2."""
  try:
    FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  return FLAGS


def parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
  """Parses `--config`, `--config.x=y` overrides and `--workdir`; bad flags exit 2."""
  try:
    FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
  if not FLAGS.workdir:
    fail("--workdir is required")
  return FLAGS.config, FLAGS.workdir


def run_guarded(fn: Callable[[], object]) -> None:
  """Runs `fn`, turning bad input (ValueError, missing files) into one line and exit 2."""
  from latentfm.train.loop import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  try:
    fn()
  except NonFiniteLossError as e:
    fail(str(e), code=1)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail(str(e).strip().splitlines()[0])


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def progress_bar(total: int, initial: int, desc: str, enabled: bool = True):
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                   dynamic_ncols=True, unit="step")


def file_progress(desc: str, enabled: bool = True):
  import tqdm  # pylint: disable=import-outside-toplevel
  return lambda items: tqdm.tqdm(items, desc=desc, disable=not enabled, leave=False)

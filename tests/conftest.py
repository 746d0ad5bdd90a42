"""Session settings (CPU, fast-compiling XLA, one compilation cache) and shared fixtures.

Helpers that tests import live in `testing_support.py` and `testing_arrays.py`.
"""

import atexit
import os
import shutil
import tempfile

from testing_support import FAST_COMPILE_XLA_FLAGS, blob_volume

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _flag, _value in FAST_COMPILE_XLA_FLAGS.items():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()
# One persistent XLA compilation cache for the whole session, inherited by the command-line
# subprocesses: a restarted run (resume tests) or a repeated tiny model reuses compiled code
# instead of recompiling it. Fresh per session, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="latentfm-test-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest

from latentfm.data.io import Volume, write_volume


@pytest.fixture
def slab_input_gradient(monkeypatch):
  """The slab convolutions' own input gradient for every cotangent: tiny test shapes would
  otherwise all take `tap_products.input_gradient`."""
  monkeypatch.setattr("latentfm.nn.cpu.slab_conv._TAPS_MIN_FULL_RATIO", float("inf"))


@pytest.fixture
def volume_dir(tmp_path):
  """A directory of 5 small NIfTI volumes with 2 mm spacing."""
  d = tmp_path / "scans"
  d.mkdir()
  for i in range(5):
    write_volume(str(d / f"scan_{i}.nii.gz"), Volume(blob_volume(seed=i), spacing=(2.0, 2.0, 2.0)))
  return d

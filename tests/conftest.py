"""Shared test fixtures: tiny synthetic volumes, written to temporary files."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny shapes, so compilation dominates. Two XLA:CPU settings compile faster and compute
# the same functions: the unoptimised backend (about a quarter faster) and the loop emitters that
# predate XLA's fusion emitters (the tiny VQ-GAN train step 14.5 -> 7.2 s, the same state and
# metrics bit for bit; the flow step 9.2 -> 5.1 s; at real sizes their code runs slower). Each
# applies unless XLA_FLAGS already sets it.
FAST_COMPILE_XLA_FLAGS = {"xla_backend_optimization_level": "0",
                          "xla_cpu_use_fusion_emitters": "false"}
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

import numpy as np
import pytest

from latentfm.data.io import Volume, write_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """`python -m ARGS` from the repository root on the CPU, output captured, no check."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def blob_volume(shape=(12, 14, 10), seed=0) -> np.ndarray:
  """A smooth ellipsoid with noise inside a zero background (a stand-in for a brain)."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  inside = (grid ** 2).sum(0) < 0.6
  return (inside * (100.0 + 20.0 * rng.standard_normal(shape))).astype(np.float32)


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
    write_volume(str(d / f"scan_{i}.nii.gz"),
                 Volume(blob_volume(seed=i), spacing=(2.0, 2.0, 2.0)))
  return d


def tiny_vqgan_config(**loss):
  """A VQ-GAN config small enough to compile and train in seconds (16³, 4 base channels)."""
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel
  c = get_config("demo")
  c.data.cohort_size = 8
  c.data.shape = (16, 16, 16)
  c.model.n_hiddens = 4
  c.model.downsample = (2, 2, 2)
  c.model.n_codes = 16
  c.model.disc_channels = 4
  c.model.disc_layers = 2
  c.loss.perceptual_weight = 0.0
  c.train.batch_size = 2
  c.train.eval_volumes = 2
  c.optim.warmup_steps, c.optim.schedule = 0, "constant"  # every one of a few steps counts
  for k, v in loss.items():
    setattr(c.loss, k, v)
  return c

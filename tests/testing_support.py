"""Helpers shared by the tests: XLA settings, tiny configs and volumes, CLI subprocesses.

Imported by `conftest.py` before JAX starts, so it imports neither JAX nor the library at the
top.
"""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests run tiny shapes, so compilation dominates. Two XLA:CPU settings compile faster and compute
# the same functions: the unoptimised backend and the loop emitters that predate XLA's fusion
# emitters (the tiny train steps compile in about half the time, with the same state and metrics
# bit for bit; at real sizes their code runs slower, so only the tests use them). `conftest.py`
# applies each unless XLA_FLAGS already sets it.
FAST_COMPILE_XLA_FLAGS = {
  "xla_backend_optimization_level": "0",
  "xla_cpu_use_fusion_emitters": "false",
}


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """`python -m ARGS` from the repository root on the CPU, output captured, no check."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def blob_volume(shape=(12, 14, 10), seed=0) -> np.ndarray:
  """A smooth ellipsoid with noise inside a zero background (a stand-in for a brain)."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  inside = (grid**2).sum(0) < 0.6
  return (inside * (100.0 + 20.0 * rng.standard_normal(shape))).astype(np.float32)


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


def tiny_flow(vq_dir, num_steps=3):
  """The `demo` flow config shrunk to train in seconds on `tiny_vqgan_config` latents."""
  from experiments.configs import flow as flow_configs  # pylint: disable=import-outside-toplevel

  c = flow_configs.get_config("demo")
  c.vqgan_workdir = str(vq_dir)
  c.model.channels = 8
  c.model.time_embed_dim = 16
  c.model.channel_mults, c.model.attention_levels = (1, 2), (1,)
  c.train.batch_size = 2
  c.train.num_steps = num_steps
  c.train.log_every = 1
  c.train.sample_every = 3
  c.train.ckpt_every = 3
  c.sample.steps = 4
  return c

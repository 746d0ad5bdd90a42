"""A run killed with SIGKILL and restarted with the same command logs exactly the same losses."""

import os
import signal
import subprocess
import sys
import time

import pytest

from latentfm.train.writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.cohort_size=8", "--config.data.shape=(16,16,16)",
        "--config.model.n_hiddens=4", "--config.model.downsample=(2,2,2)",
        "--config.model.n_codes=16", "--config.model.disc_channels=4",
        "--config.model.disc_layers=2", "--config.loss.perceptual_weight=0.0",
        "--config.loss.discriminator_start=3", "--config.train.batch_size=2",
        "--config.train.num_steps=7", "--config.train.log_every=1",
        "--config.train.eval_every=100", "--config.train.image_every=100",
        "--config.train.ckpt_every=2", "--config.train.eval_volumes=2"]


def command(workdir):
  return [sys.executable, "-m", "experiments.vqgan", "--config",
          "experiments/configs/vqgan.py:demo", "--workdir", str(workdir), *TINY]


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted(tmp_path):
  subprocess.run(command(tmp_path / "full"), cwd=ROOT, env=env(), check=True,
                 capture_output=True, timeout=600)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(command(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    path = killed / "metrics.jsonl"
    if path.is_file() and any('"step": 5' in l for l in path.read_text().splitlines()):
      break  # past the step-4 checkpoint, before the end: kill without warning
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(command(killed), cwd=ROOT, env=env(), check=True, capture_output=True,
                 timeout=600)
  full, resumed = read_metrics(str(tmp_path / "full")), read_metrics(str(killed))
  assert [r["step"] for r in resumed] == [r["step"] for r in full] == list(range(8))
  assert resumed == full  # bitwise: every loss of every step, GAN phase included

"""Runs killed with SIGKILL and restarted with the same command log exactly the same losses.

Both stages, through their command lines. The flow stage trains on the latents of the VQ-GAN
run, and also shows the non-finite guard end to end (exit 1, last good checkpoint kept).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from latentfm.train.writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQGAN = [
  "-m",
  "experiments.vqgan",
  "--config",
  "experiments/configs/vqgan.py:demo",
  "--config.data.cohort_size=8",
  "--config.data.shape=(16,16,16)",
  "--config.model.n_hiddens=4",
  "--config.model.downsample=(2,2,2)",
  "--config.model.n_codes=16",
  "--config.model.disc_channels=4",
  "--config.model.disc_layers=2",
  "--config.loss.perceptual_weight=0.0",
  "--config.loss.discriminator_start=3",
  "--config.train.batch_size=2",
  "--config.train.num_steps=7",
  "--config.train.log_every=1",
  "--config.train.eval_every=100",
  "--config.train.image_every=100",
  "--config.train.ckpt_every=2",
  "--config.train.eval_volumes=2",
  "--config.train.tensorboard=False",
]
FLOW = [
  "-m",
  "experiments.flow",
  "--config",
  "experiments/configs/flow.py:demo",
  "--config.model.channels=8",
  "--config.model.time_embed_dim=16",
  "--config.model.channel_mults=(1,)",
  "--config.model.attention_levels=()",
  "--config.train.batch_size=2",
  "--config.train.log_every=1",
  "--config.train.sample_every=0",
  "--config.train.tensorboard=False",
  "--config.train.num_steps=60",
  "--config.train.ckpt_every=5",
]


def run(args, workdir, check=True):
  return subprocess.run(
    [sys.executable, *args, "--workdir", str(workdir)],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    check=check,
    capture_output=True,
    text=True,
    timeout=600,
  )


def signal_past(args, workdir, step, sig=signal.SIGKILL):
  """Starts the command, sends `sig` once `metrics.jsonl` has a row past `step`, waits.

  Returns `(exit code, stderr, last logged step)`.
  """
  proc = subprocess.Popen(
    [sys.executable, *args, "--workdir", str(workdir)],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  path, deadline = workdir / "metrics.jsonl", time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if path.is_file() and any(f'"step": {step + 1}' in l for l in path.read_text().splitlines()):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before the signal"
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=600)
  return proc.returncode, stderr, max(r["step"] for r in read_metrics(str(workdir)))


@pytest.fixture(scope="module")
def vqgan_full(tmp_path_factory):
  """An uninterrupted tiny VQ-GAN run (also the frozen autoencoder of the flow tests)."""
  workdir = tmp_path_factory.mktemp("vqgan") / "full"
  run(VQGAN, workdir)
  return workdir


@pytest.mark.slow
def test_vqgan_sigkill_then_restart_matches_uninterrupted(vqgan_full, tmp_path):
  killed = tmp_path / "killed"
  signal_past(VQGAN, killed, 4)  # past the step-4 checkpoint, before the end
  run(VQGAN, killed)
  full, resumed = read_metrics(str(vqgan_full)), read_metrics(str(killed))
  assert [r["step"] for r in resumed] == [r["step"] for r in full] == list(range(8))
  assert resumed == full  # bitwise: every loss of every step, GAN phase included


@pytest.fixture(scope="module")
def flow_full(vqgan_full, tmp_path_factory):
  """An uninterrupted 60-step flow run on the latents of `vqgan_full`."""
  workdir = tmp_path_factory.mktemp("flow") / "full"
  run(FLOW + [f"--config.vqgan_workdir={vqgan_full}"], workdir)
  return workdir


@pytest.mark.slow
def test_flow_sigkill_and_sigterm_then_restart_match_uninterrupted(vqgan_full, flow_full, tmp_path):
  args = FLOW + [f"--config.vqgan_workdir={vqgan_full}"]
  killed = tmp_path / "killed"
  code, _, last = signal_past(args, killed, 12)
  assert code == -signal.SIGKILL and last < 60
  code, stderr, last = signal_past(args, killed, 25, signal.SIGTERM)  # resumes, then preempted
  assert code == 0 and last < 60
  assert f"stopped by signal {int(signal.SIGTERM)} at step {last}; checkpoint saved" in stderr
  assert (killed / "ckpt" / str(last)).is_dir()  # saved at the step it stopped at
  run(args, killed)
  full, resumed = read_metrics(str(flow_full)), read_metrics(str(killed))
  assert [r["step"] for r in resumed] == list(range(1, 61))
  assert resumed == full  # bitwise: params, Adam, EMA, data order and RNG all resumed


@pytest.mark.slow
def test_flow_nonfinite_loss_exits_1_and_keeps_checkpoint(vqgan_full, flow_full, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(flow_full, workdir)
  ckpt = workdir / "ckpt"
  before = sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
  # Resumed at step 60 with a learning rate of 1e30 (a change the resume must be allowed to
  # make): step 61's update overflows, so step 62's loss or gradient is not finite.
  result = run(
    FLOW
    + [
      f"--config.vqgan_workdir={vqgan_full}",
      "--config.train.num_steps=68",
      "--config.optim.lr=1e30",
      "--config.train.allow_changes=true",
    ],
    workdir,
    check=False,
  )
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert re.search(
    r"step 62: \w+ is (nan|inf); stopping with the last good checkpoint kept", message
  ), message
  assert sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before

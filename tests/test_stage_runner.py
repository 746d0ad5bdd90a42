"""The stage runner on a toy stage: one run per workdir, guarded resume with a recorded
history, and a corrupt newest checkpoint skipped for the one before."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_verified_checkpoints import flip_bytes, largest_array_file

from experiments.configs import shared
from latentfm.data import loader
from latentfm.train import run_record, runner, workdir_lock
from latentfm.train.writer import read_metrics


def toy_config(num_steps=4, lr=0.1):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.optim = ml_collections.ConfigDict({"lr": lr})
  c.train = shared.train(batch_size=2, log_every=1, ckpt_every=2)
  c.train.num_steps = num_steps
  c.train.tensorboard = False
  c.train.reuse_host_memory = False
  return c


def toy_data():
  rng = np.random.default_rng(0)
  return loader.Dataset(
    rng.random((6, 4, 4, 4), dtype=np.float32),
    np.arange(6, dtype=np.int32),
    tuple(map(str, range(6))),
  )


def run_toy(workdir, config):
  lr = config.optim.lr

  @jax.jit
  def step(state, batch):
    w = state["w"] + lr * jnp.mean(batch["image"])
    return {"w": w, "step": state["step"] + 1}, {"loss": jnp.mean(w)}

  with runner.open_stage("toy", config, str(workdir), validate=lambda c: None) as run:
    noise = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    state = run.start({"w": jnp.asarray(noise), "step": jnp.zeros((), jnp.int32)}, toy_data())
    first = run.first_step
    result = run.train(state, lambda s, b, i: step(s, b))
  return first, result


def files(directory):
  """Relative path -> bytes of every file but the lock (which names the latest holder)."""
  return {
    os.path.relpath(os.path.join(r, p), directory): open(os.path.join(r, p), "rb").read()
    for r, _, fs in os.walk(directory)
    for p in fs
    if p != workdir_lock.LOCK_NAME
  }


def test_changed_setting_is_refused_then_recorded_when_allowed(tmp_path):
  run_toy(tmp_path, toy_config())
  before = files(tmp_path)
  with pytest.raises(
    run_record.SettingsChangedError,
    match=r"other settings \(optim\.lr 0\.1 -> 0\.5\).*allow_changes",
  ):
    run_toy(tmp_path, toy_config(num_steps=6, lr=0.5))
  assert files(tmp_path) == before  # nothing written, nothing rotated away
  changed = toy_config(num_steps=8, lr=0.5)
  changed.train.allow_changes = True
  changed.train.keep_checkpoints = 1
  first, result = run_toy(tmp_path, changed)
  assert first == 4 and result.step == 8
  history = [json.loads(l) for l in open(tmp_path / run_record.HISTORY)]
  assert [h["step"] for h in history] == [0, 4]
  assert history[1]["changes"]["optim.lr"] == [0.1, 0.5]
  assert history[0]["config"]["optim"]["lr"] == 0.1  # the first settings stay on record
  assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 0.5
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "8"]  # the step before the change kept


def test_run_length_may_change_freely(tmp_path):
  run_toy(tmp_path, toy_config(num_steps=2))
  first, result = run_toy(tmp_path, toy_config(num_steps=4))
  assert (first, result.step) == (2, 4)
  history = [json.loads(l) for l in open(tmp_path / run_record.HISTORY)]
  assert history[1]["changes"] == {"train.num_steps": [2, 4]}


def test_second_run_on_a_workdir_is_refused(tmp_path):
  with workdir_lock.hold(str(tmp_path), "toy training"):
    with pytest.raises(
      workdir_lock.WorkdirLockedError,
      match=rf"in use by pid {os.getpid()} on .*\(toy training, started",
    ):
      run_toy(tmp_path, toy_config())
  assert not (tmp_path / "ckpt").exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from latentfm.train import workdir_lock\n"
      f"with workdir_lock.hold({str(tmp_path)!r}, 'x'):\n  print('held', flush=True); "
      "time.sleep(60)",
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid} "):
    with workdir_lock.hold(str(tmp_path), "y"):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(str(tmp_path), "y"):
    assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()


def test_corrupt_newest_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
  _, full = run_toy(tmp_path / "full", toy_config(num_steps=6))
  run_toy(tmp_path / "run", toy_config(num_steps=4))  # checkpoints 2 and 4
  flip_bytes(largest_array_file(tmp_path / "run" / "ckpt" / "4"))
  first, result = run_toy(tmp_path / "run", toy_config(num_steps=6))
  warning = [l for l in capsys.readouterr().err.splitlines() if "warning:" in l]
  assert len(warning) == 1 and "checkpoint step 4" in warning[0]
  assert first == 2 and (tmp_path / "run" / "ckpt" / "corrupt-4").is_dir()
  np.testing.assert_array_equal(result.state["w"], full.state["w"])
  assert read_metrics(str(tmp_path / "run")) == read_metrics(str(tmp_path / "full"))


def test_changed_data_is_refused_then_continued_with_a_fresh_epoch(tmp_path):
  run_toy(tmp_path, toy_config())
  line = "DATA changed since this workdir was trained: 1 added (x.nii.gz)"
  with runner.open_stage("toy", toy_config(), str(tmp_path), validate=lambda c: None) as run:
    with pytest.raises(run_record.SettingsChangedError, match="1 added.*allow_changes=true"):
      run.data_changed(line)
  allowed = toy_config(num_steps=6)
  allowed.train.allow_changes = True
  with runner.open_stage("toy", allowed, str(tmp_path), validate=lambda c: None) as run:
    run.data_changed(line)
    run.start({"w": jnp.zeros((64, 64)), "step": jnp.zeros((), jnp.int32)}, toy_data())
    assert run.first_step == 4 and run.fresh_epoch
  history = [json.loads(l) for l in open(tmp_path / run_record.HISTORY)]
  assert history[-1]["step"] == 4 and history[-1]["note"] == line

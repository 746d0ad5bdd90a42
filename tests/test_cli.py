"""Command-line entry points: bad input gives one line on stderr and exit code 2."""

import os
import subprocess
import sys

import pytest
from testing_support import ROOT
from testing_support import run_module as run

VQ = ("experiments.vqgan", "--config", "experiments/configs/vqgan.py:demo")


@pytest.mark.parametrize(
  "extra,expected",
  [
    (["--config.model.nope=3"], "nope"),
    (["--config.data.shape=(31,32,32)"], "not divisible"),
    (["--config.data.dir=/no/such/dir"], "/no/such/dir"),
    (["--config.train.batch_size=0"], "batch"),
    (["--config.train.on_nonfinite=ignore"], "train.on_nonfinite"),
  ],
)
def test_vqgan_bad_input_exits_2(tmp_path, extra, expected):
  result = run(*VQ, "--workdir", str(tmp_path / "w"), *extra)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


def one_line_exit_2(result, expected):
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


def test_vqgan_empty_data_dir_exits_2(tmp_path):
  (tmp_path / "empty").mkdir()
  one_line_exit_2(
    run(*VQ, "--workdir", str(tmp_path / "w"), f"--config.data.dir={tmp_path / 'empty'}"),
    str(tmp_path / "empty"),
  )
  assert not (tmp_path / "w" / "ckpt").exists()


FLOW = ("experiments.flow", "--config", "experiments/configs/flow.py:demo")


@pytest.mark.parametrize(
  "extra,expected",
  [
    ([], "vqgan_workdir is required"),
    (["--config.vqgan_workdir=/no/such/run"], "/no/such/run"),
    (["--config.vqgan_workdir=/tmp", "--config.flow.nope=1"], "nope"),
  ],
)
def test_flow_bad_input_exits_2(tmp_path, extra, expected):
  one_line_exit_2(run(*FLOW, "--workdir", str(tmp_path / "w"), *extra), expected)


def test_vqgan_requires_workdir():
  result = run(*VQ)
  assert result.returncode == 2 and "--workdir" in result.stderr


def test_unknown_config_name(tmp_path):
  result = run(
    "experiments.vqgan", "--config", "experiments/configs/vqgan.py:nope", "--workdir", str(tmp_path)
  )
  one_line_exit_2(result, "unknown vqgan config 'nope'; choose thesis")


def test_cohort_command(tmp_path):
  out = tmp_path / "c"
  result = run("experiments.cohort", "--out", str(out), "--n", "4", "--size", "16")
  assert result.returncode == 0, result.stderr
  assert (out / "manifest.csv").is_file() and (out / "montage.png").is_file()
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "keep.txt").write_text("x")
  result = run("experiments.cohort", "--out", str(tmp_path / "other"), "--n", "4", "--size", "16")
  assert result.returncode == 2 and "refusing" in result.stderr
  assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_stray_argument_exits_2(tmp_path):
  one_line_exit_2(run(*VQ, "--workdir", str(tmp_path / "w"), "stray"), "unexpected argument")


def test_missing_config_file_is_named(tmp_path):
  one_line_exit_2(
    run(
      "experiments.vqgan",
      "--config",
      "experiments/configs/vqgn.py",
      "--workdir",
      str(tmp_path / "w"),
    ),
    "vqgn.py: no such file",
  )


@pytest.mark.parametrize(
  "error,expected",
  [
    (OSError(28, "No space left on device", "/w/ckpt/6"), "/w/ckpt/6: the disk is full"),
    (OSError(30, "Read-only file system", "/w/.lock"), "/w/.lock: read-only file system"),
    (OSError(40, "Too many levels of symbolic links", "/d/a.nii"), "/d/a.nii: symbolic link loop"),
  ],
)
def test_os_errors_are_one_line_exit_2(capsys, error, expected):
  from experiments import common  # pylint: disable=import-outside-toplevel

  def fails():
    raise error

  with pytest.raises(SystemExit) as info:
    common.run_guarded(fails)
  assert info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0]


def test_every_unusable_file_gets_its_own_line(capsys):
  from experiments import common  # pylint: disable=import-outside-toplevel
  from latentfm.data.io import ManyErrors  # pylint: disable=import-outside-toplevel

  def fails():
    raise ManyErrors("2 of 5 files in /d are unusable:", ["/d/a.nii: x", "/d/b.nii: y"])

  with pytest.raises(SystemExit) as info:
    common.run_guarded(fails)
  lines = capsys.readouterr().err.strip().splitlines()
  assert info.value.code == 2 and len(lines) == 3
  assert lines[0].endswith("2 of 5 files in /d are unusable:") and lines[2] == "  /d/b.nii: y"


def test_stage_figures_draw_inside_the_evaluate_command(tmp_path):
  # The report's per-stage figures are drawn after evaluate's flags are defined: a helper that
  # imported another command's module would define its flags again and crash at the end.
  code = (
    "import sys, numpy as np; from absl import flags; from experiments import evaluate, "
    "stage_figures; evaluate.define_flags(); flags.FLAGS(['x']); v = np.zeros((2, 8, 8, 8)); "
    "stage_figures.stage_montage(sys.argv[1] + '/s.png', v, np.array([0, 3])); "
    "stage_figures.edit_montage(sys.argv[1] + '/e.png', {'truth': v, 'edit': v, "
    "'residual': v, 'targets': np.array([0, 3]), 'source': 0})"
  )
  done = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)],
    cwd=ROOT,
    text=True,
    capture_output=True,
    timeout=120,
    check=False,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "s.png").is_file() and (tmp_path / "e.png").is_file()

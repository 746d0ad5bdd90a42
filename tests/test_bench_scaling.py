"""bench.scaling: one process per device count, its table, and failing children."""

import argparse
import re

import pytest
from testing_support import run_module

from bench import scaling


def test_times_the_sharded_flow_step_on_two_forced_devices():
  out = run_module(
    "bench.scaling",
    "--devices",
    "2",
    "--per-device-batch",
    "1",
    "--latent",
    "4",
    "--config",
    "demo",
    "--repeats",
    "1",
    timeout=300,
  )
  assert out.returncode == 0, out.stderr
  row = re.search(r"^\| 2 \| 2 \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", out.stdout, re.M)
  assert row, out.stdout
  ms, rate, per_device = map(float, row.groups())
  assert ms > 0 and abs(rate * ms / 2e3 - 1) <= 0.5 / ms + 0.01  # ms is printed rounded
  assert per_device == pytest.approx(rate / 2, abs=0.01)
  assert "share this machine's cores" in out.stdout


def test_a_failing_device_count_is_named_and_the_exit_status_is_one(capsys):
  assert scaling.main(["--devices", "1", "--config", "nope", "--repeats", "1"]) == 1
  assert re.search(
    r"^\| 1 \| failed: ValueError: unknown config 'nope'", capsys.readouterr().out, re.M
  )


def test_device_counts_parse_positive_integers_only():
  assert scaling.device_counts("1,2,4") == [1, 2, 4]
  for text in ("", "1,x", "0,2"):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
      scaling.device_counts(text)

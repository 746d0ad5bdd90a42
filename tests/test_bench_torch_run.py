"""bench.torch_run: the PyTorch timings `bench.run --torch` compares with."""

import pytest

pytest.importorskip("torch", reason="the PyTorch benchmark modules need the test extra")
# pylint: disable=wrong-import-position
from bench import torch_run


def test_run_times_each_stage_it_has_a_counterpart_of():
  rows = torch_run.run(
    ["vqgan_ae", "flow", "conv3", "resblock", "sample"],
    size=32,
    batch=1,
    repeats=1,
    dtype="float32",
    downsample=4,
  )
  assert list(rows) == ["vqgan_ae", "flow", "conv3", "resblock"]  # no PyTorch sampling
  assert rows["flow"][0] == "torch flow train step 8^3x8 b1 float32"
  assert all(seconds > 0 for _, seconds in rows.values())


def test_run_skips_the_autoencoder_outside_the_thesis_layout():
  rows = torch_run.run(
    ["vqgan_ae", "vqgan", "flow"], size=16, batch=1, repeats=1, dtype="float32", downsample=2
  )
  assert list(rows) == ["flow"] and rows["flow"][0].startswith("torch flow train step 8^3x8")

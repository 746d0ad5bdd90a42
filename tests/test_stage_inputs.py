"""Checks of the stages' inputs and outputs that need no trained model: labels, workdirs and
never overwriting samples."""

import os

import numpy as np
import pytest
from testing_support import tiny_flow

from experiments import flow as flow_stage
from experiments import sample as sample_cli
from latentfm import sample


def test_flow_rejects_unlabelled_data_for_a_conditional_model():
  with pytest.raises(ValueError, match=r"num_classes = 4.*\[-1\]"):
    flow_stage.check_labels(np.array([0, 1, -1]), 4, "vq")
  flow_stage.check_labels(np.array([-1, -1]), 0, "vq")  # unconditional: labels unused


def test_flow_rejects_missing_vqgan(tmp_path):
  with pytest.raises(ValueError, match="vqgan_workdir"):
    flow_stage.validate_config(tiny_flow(tmp_path / "nothing"))


def test_samples_are_never_overwritten_or_mixed(tmp_path):
  volumes = np.random.default_rng(0).random((2, 6, 6, 6), dtype=np.float32)
  out = str(tmp_path / "s")
  sample.write_samples(out, volumes)
  first = (tmp_path / "s" / "sample_0000.nii.gz").read_bytes()
  with pytest.raises(ValueError, match="is not empty"):
    sample.write_samples(out, volumes[:1] * 0.5)
  with pytest.raises(ValueError, match="--out .* is not empty"):
    sample_cli.choose_out(str(tmp_path), out)
  assert sorted(os.listdir(out)) == ["sample_0000.nii.gz", "sample_0001.nii.gz", "samples.png"]
  assert (tmp_path / "s" / "sample_0000.nii.gz").read_bytes() == first
  workdir = tmp_path / "flow"
  numbered = []
  for _ in range(3):  # the default is the next free WORKDIR/samples[_N]
    numbered.append(sample_cli.choose_out(str(workdir), None))
    sample.write_samples(numbered[-1], volumes[:1])
  assert [os.path.basename(p) for p in numbered] == ["samples", "samples_1", "samples_2"]

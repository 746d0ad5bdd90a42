"""bench.stage_control: per-class means go to their class, and the rising flag reads them."""

import os

import numpy as np

from bench import stage_control
from latentfm.data import cohort
from latentfm.metrics.features import tissue_volumes


def test_stage_means_are_taken_per_class():
  volumes, labels = cohort.make_cohort(4, (24, 24, 24), seed=3)
  order = np.array([2, 0, 3, 1])  # labels out of order, so that a class mix-up shows
  volumes, labels = volumes[order], labels[order]
  means = stage_control.stage_means(volumes, labels, 4)
  truth = tissue_volumes(volumes)
  for key in ("csf_fraction", "ventricle_fraction"):
    expected = [float(truth[key][labels == c][0]) for c in range(4)]
    np.testing.assert_allclose(means[key], expected)


def test_row_says_whether_ventricles_rise_with_the_stage():
  rising = {"ventricle_fraction": [0.006, 0.007, 0.01, 0.02], "csf_fraction": [0.25] * 4}
  row = stage_control._row("w = 1", rising, "0.50", "9")
  assert row.split(" | ")[2] == "yes" and "0.0060 / 0.0070 / 0.0100 / 0.0200" in row
  falling = {**rising, "ventricle_fraction": [0.01, 0.007, 0.006, 0.004]}
  assert stage_control._row("w = 1", falling, "0.50", "9").split(" | ")[2] == "no"


def test_reference_cohort_has_every_stage_where_the_training_cohort_lacks_some(tmp_path):
  from experiments.configs import flow as flow_configs
  from experiments.configs import vqgan as vqgan_configs
  from latentfm.train import run_record

  vq = vqgan_configs.get_config("demo")
  vq.data.shape, vq.data.cohort_size = (16, 16, 16), 8
  vq.data.stage_proportions = (0.0, 0.0, 0.5, 0.5)  # the thesis' data lacks early stages
  fl = flow_configs.get_config("demo")
  fl.vqgan_workdir = str(tmp_path / "vqgan")
  for name, config in (("vqgan", vq), ("flow", fl)):
    os.makedirs(tmp_path / name)
    run_record.record(str(tmp_path / name), config, 0, {})
  own, own_labels = stage_control.real_volumes(str(tmp_path / "flow"))
  assert sorted(set(own_labels.tolist())) == [2, 3] and own.shape == (8, 16, 16, 16)
  ref, ref_labels = stage_control.real_volumes(str(tmp_path / "flow"), reference=8)
  assert np.bincount(ref_labels).tolist() == [2, 2, 2, 2] and ref.shape == (8, 16, 16, 16)
  assert not np.allclose(ref[ref_labels == 2][0], own[own_labels == 2][0])  # another seed

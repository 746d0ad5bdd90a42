"""bench.stage_control: per-class means go to their class, and the rising flag reads them."""

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

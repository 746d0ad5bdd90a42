import csv
import os

import numpy as np
import pytest

from latentfm.data import cohort
from latentfm.data.io import VolumeError, read_volume

SHAPE = (32, 32, 32)


def csf_fraction(volume: np.ndarray) -> float:
  """Dark (CSF-like) voxels inside the brain, relative to its bright white matter."""
  brain = volume > 0.05
  white = np.percentile(volume[brain], 90)
  return float(((volume < 0.5 * white) & brain).sum() / brain.sum())


def ventricle_fraction(volume: np.ndarray) -> float:
  """Dark voxels in the central quarter-box of the volume, where the lateral ventricles lie."""
  n = volume.shape[0]
  centre = volume[n * 3 // 8 : n * 5 // 8, n * 3 // 8 : n * 5 // 8, n * 3 // 8 : n * 5 // 8]
  white = np.percentile(volume[volume > 0.05], 90)
  return float((centre < 0.6 * white).mean())


@pytest.fixture(scope="module")
def small_cohort():
  return cohort.make_cohort(24, SHAPE, seed=0)


def test_template_is_read_from_nilearn():
  assert os.path.isfile(cohort.template_path("t1"))
  assert "nilearn" in cohort.template_path("gm")


def test_make_cohort_shapes_range_and_labels(small_cohort):
  volumes, stages = small_cohort
  assert volumes.shape == (24,) + SHAPE and volumes.dtype == np.float32
  assert volumes.min() >= 0.0 and volumes.max() <= 1.0
  assert stages.dtype == np.int32 and list(np.bincount(stages)) == [6, 6, 6, 6]
  assert (volumes[:, 0] == 0).mean() > 0.9  # skull-stripped: background at the border
  corr = np.corrcoef(volumes[0].ravel(), volumes[4].ravel())[0, 1]
  assert 0.7 < corr < 0.999  # same anatomy, different subjects


def test_make_cohort_deterministic(small_cohort):
  volumes, _ = small_cohort
  again, _ = cohort.make_cohort(3, SHAPE, seed=0)
  np.testing.assert_array_equal(again, volumes[:3])  # subject i does not depend on n
  other, _ = cohort.make_cohort(3, SHAPE, seed=1)
  assert not np.allclose(other, volumes[:3])


@pytest.fixture(scope="module")
def cohort48():
  return cohort.make_cohort(24, (48, 48, 48), seed=0)


@pytest.mark.parametrize("measure", [csf_fraction, ventricle_fraction])
def test_stages_differ_measurably(cohort48, measure):
  volumes, stages = cohort48
  fractions = np.array([measure(v) for v in volumes])
  means = [fractions[stages == s].mean() for s in range(cohort.NUM_STAGES)]
  assert all(a < b for a, b in zip(means, means[1:])), means  # monotonic in stage
  assert means[-1] - means[0] > 0.015, means


def test_make_subject_rejects_bad_stage():
  with pytest.raises(ValueError, match="stage"):
    cohort.make_subject(cohort.load_template(SHAPE), 4, 0)


def test_write_cohort_manifest_and_reuse(tmp_path):
  d = str(tmp_path / "cohort")
  cohort.write_cohort(d, 4, (16, 16, 16), seed=3)
  with open(os.path.join(d, "manifest.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["stage"] for r in rows] == ["0", "1", "2", "3"]
  assert [int(r["seed"]) for r in rows] == list(cohort.subject_seeds(4, 3))
  vol = read_volume(os.path.join(d, rows[1]["file"]))
  expected, _ = cohort.make_cohort(4, (16, 16, 16), seed=3)
  np.testing.assert_allclose(vol.array, expected[1], atol=1e-6)
  assert vol.spacing[0] > 5.0  # a ~190 mm brain on 16 voxels
  mtime = os.path.getmtime(os.path.join(d, rows[0]["file"]))
  cohort.write_cohort(d, 4, (16, 16, 16), seed=3)  # same spec: reused, not rewritten
  assert os.path.getmtime(os.path.join(d, rows[0]["file"])) == mtime
  with pytest.raises(VolumeError, match="refusing to write"):
    cohort.write_cohort(d, 5, (16, 16, 16), seed=3)

"""The 2.5D pretrained-VGG16 features measure what the report uses them for: real sets score
near each other, the distance grows with blur and with noise, and it tells atrophy stages apart.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi

from latentfm.data import cohort
from latentfm.metrics import generative as gm
from latentfm.metrics import vgg_features

N = 10  # subjects per set


@pytest.fixture(scope="module")
def sets():
  """Disjoint 32³ subject sets: two with mixed stages, a stage-0 and a stage-3 one."""
  template = cohort.load_template((32, 32, 32))
  make = lambda stages, first: np.stack(
    [cohort.make_subject(template, int(s), 1000 + first + i) for i, s in enumerate(stages)]
  )
  mixed = np.arange(N) % cohort.NUM_STAGES
  return {
    "ref": make(mixed, 0),
    "other": make(mixed, 100),
    "stage0": make(np.zeros(N), 200),
    "stage0b": make(np.zeros(N), 300),
    "stage3": make(np.full(N, 3), 400),
  }


@pytest.fixture(scope="module")
def extract():
  return vgg_features.vgg25d_features(num_slices=4, size=32, batch_size=5)


def _fd(extract, a, b):
  return gm.frechet_distance(extract(a), extract(b))


def test_slice_indices_span_the_centre():
  np.testing.assert_array_equal(vgg_features.slice_indices(32, 4, 0.6), [6, 12, 19, 25])
  np.testing.assert_array_equal(vgg_features.slice_indices(5, 8, 1.0), [0, 1, 2, 3, 4])
  with pytest.raises(ValueError, match="central_fraction"):
    vgg_features.slice_indices(32, 4, 0.0)


def test_features_shape_and_batch_independence(sets, extract):
  f = extract(sets["ref"][:3])
  assert f.shape == (3, 3 * (512 + 512)) and f.dtype == np.float64
  np.testing.assert_allclose(extract(sets["ref"][:1]), f[:1], rtol=1e-4, atol=1e-5)
  assert np.all(f >= 0)  # pooled post-ReLU activations


def test_real_sets_near_floor_and_distance_grows_with_blur_and_noise(sets, extract):
  ref, other = extract(sets["ref"]), sets["other"]
  floor = gm.frechet_distance(extract(other), ref)
  fd_real = gm.frechet_distance(extract(sets["stage0"]), extract(sets["stage0b"]))
  rng = np.random.default_rng(0)
  blurred = [
    gm.frechet_distance(extract(ndi.gaussian_filter(other, (0, s, s, s))), ref)
    for s in (0.6, 1.0, 1.5, 2.5)
  ]
  noise = rng.standard_normal(other.shape).astype(np.float32)
  noisy = [
    gm.frechet_distance(extract(np.clip(other + s * noise, 0, 1)), ref)
    for s in (0.03, 0.06, 0.12, 0.25)
  ]
  print(f"floor {floor:.4g}, stage-0 vs stage-0 {fd_real:.4g}, blur {blurred}, noise {noisy}")
  assert all(b > a for a, b in zip(blurred, blurred[1:])), blurred
  assert all(b > a for a, b in zip(noisy, noisy[1:])), noisy
  assert blurred[1] > 2 * floor and noisy[1] > 2 * floor


def test_separates_stage0_from_stage3(sets, extract):
  """Same-stage sets differ by sampling noise only: KID near 0, and a smaller FD."""
  f0, f0b, f3 = (extract(sets[k]) for k in ("stage0", "stage0b", "stage3"))
  fd_same, fd_apart = gm.frechet_distance(f0, f0b), gm.frechet_distance(f0, f3)
  kid = lambda a, b: gm.kernel_inception_distance(a, b, num_subsets=20)[0]
  kid_same, kid_apart = kid(f0, f0b), kid(f0, f3)
  print(
    f"stage 0 vs 0: FD {fd_same:.4g}, KID {kid_same:.3g}; "
    f"stage 0 vs 3: FD {fd_apart:.4g}, KID {kid_apart:.3g}"
  )
  assert fd_apart > 1.2 * fd_same
  assert kid_apart > 5 * abs(kid_same)

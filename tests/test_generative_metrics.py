"""Tests for latentfm.metrics.generative and latentfm.metrics.features."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from latentfm.data import cohort
from latentfm.metrics import features as ft
from latentfm.metrics import generative as gm


@pytest.fixture(scope="module")
def cohort48():
  return cohort.make_cohort(24, (48, 48, 48), seed=0)


@pytest.fixture(scope="module")
def conv_features():
  return ft.random_conv_features(seed=0)


# ----------------------------------------------------------------- Fréchet --


def test_frechet_matches_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  var1, var2 = rng.uniform(0.1, 2.0, 6), rng.uniform(0.1, 2.0, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))
  got = gm.frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2), eps=0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_matches_sqrtm_for_full_covariances():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
  cov1, cov2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  root = scipy.linalg.sqrtm(cov1 @ cov2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2.0 * root)
  got = gm.frechet_distance_from_stats(mu1, cov1, mu2, cov2, eps=0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_from_samples_approaches_population_value():
  rng = np.random.default_rng(2)
  sd1, sd2 = np.array([1.0, 0.5, 2.0]), np.array([1.5, 0.5, 1.0])
  a = rng.normal(size=(20000, 3)) * sd1
  b = rng.normal(size=(20000, 3)) * sd2 + np.array([1.0, 0.0, 0.0])
  expected = 1.0 + np.sum((sd1 - sd2) ** 2)  # sigma = sd^2 in the closed form
  assert gm.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)


def test_frechet_in_the_common_span_equals_the_full_width_formula():
  """With fewer points than features the distance is computed in the points' span: exact."""
  rng = np.random.default_rng(7)
  a = rng.normal(size=(6, 40)) @ rng.normal(size=(40, 40))
  b = rng.normal(size=(5, 40)) * 2.0 + 1.0
  cov = lambda x: np.cov(x, rowvar=False)
  full = gm.frechet_distance_from_stats(a.mean(0), cov(a), b.mean(0), cov(b))
  assert gm.frechet_distance(a, b) == pytest.approx(full, rel=1e-7)


def test_frechet_singular_small_sample():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 40)), rng.normal(size=(6, 40)) + 1.0
  value = gm.frechet_distance(a, b)
  assert np.isfinite(value) and value > 40.0  # mean shift alone gives 40
  assert gm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError):
    gm.frechet_distance(a[:1], b)


# ----------------------------------------------------------------- MMD/KID --


def _brute_mmd2(a, b, kernel):
  """Unbiased MMD^2 by explicit double loops."""
  m, n = len(a), len(b)
  kaa = sum(kernel(a[i], a[j]) for i in range(m) for j in range(m) if i != j)
  kbb = sum(kernel(b[i], b[j]) for i in range(n) for j in range(n) if i != j)
  kab = sum(kernel(a[i], b[j]) for i in range(m) for j in range(n))
  return kaa / (m * (m - 1)) + kbb / (n * (n - 1)) - 2.0 * kab / (m * n)


def test_kid_matches_brute_force():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) + 0.3
  poly = lambda x, y: (np.dot(x, y) / 5 + 1.0) ** 3
  mean, std = gm.kernel_inception_distance(a, b, subset_size=6, num_subsets=3)
  assert mean == pytest.approx(_brute_mmd2(a, b, poly), abs=1e-6)
  assert std == pytest.approx(0.0, abs=1e-9)  # every subset is the full set
  c = rng.normal(size=(9, 5))
  k = gm.polynomial_kernel
  assert gm.mmd2_unbiased(k(a, a), k(c, c), k(a, c)) == pytest.approx(
    _brute_mmd2(a, c, poly), abs=1e-6
  )


def test_mmd_rbf_matches_brute_force_with_median_heuristic():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.5
  pooled = np.concatenate([a, b])
  h = np.median([np.linalg.norm(x - y) for x, y in itertools.combinations(pooled, 2)])
  rbf = lambda x, y: np.exp(-np.sum((x - y) ** 2) / (2.0 * h * h))
  assert gm.mmd_rbf(a, b) == pytest.approx(_brute_mmd2(a, b, rbf), abs=1e-6)
  rbf1 = lambda x, y: np.exp(-np.sum((x - y) ** 2) / 2.0)
  assert gm.mmd_rbf(a, b, bandwidth=1.0) == pytest.approx(_brute_mmd2(a, b, rbf1), abs=1e-6)


def test_kid_and_mmd_near_zero_for_same_distribution():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
  shifted = rng.normal(size=(200, 16)) + 0.5
  same, _ = gm.kernel_inception_distance(a, b, subset_size=100, num_subsets=20)
  diff, _ = gm.kernel_inception_distance(a, shifted, subset_size=100, num_subsets=20)
  assert abs(same) < 0.05 * diff and diff > 0.1
  assert abs(gm.mmd_rbf(a, b)) < 0.1 * gm.mmd_rbf(a, shifted)


# ---------------------------------------------------------------- features --


def test_random_conv_features_deterministic_and_batch_invariant(cohort48, conv_features):
  volumes = cohort48[0][:5]
  f = conv_features(volumes)
  assert f.shape == (5, 2 * (16 + 32 + 64) + 3 * (16 + 4))
  assert np.all(np.isfinite(f))
  np.testing.assert_array_equal(f, ft.random_conv_features(seed=0)(volumes))
  small = ft.random_conv_features(seed=0, batch_size=2)(volumes)
  np.testing.assert_allclose(small, f, rtol=1e-5, atol=1e-6)
  assert not np.allclose(ft.random_conv_features(seed=1)(volumes), f)


def test_conv_features_separate_brains_from_noise(cohort48, conv_features):
  volumes, _ = cohort48
  real = conv_features(volumes)
  rng = np.random.default_rng(7)
  noise = conv_features(rng.random(volumes[:12].shape) * (volumes[:12] > 0))
  within = gm.frechet_distance(real[::2], real[1::2])
  across = gm.frechet_distance(real[::2], noise)
  assert across > 5.0 * within


def test_intensity_histogram_features():
  rng = np.random.default_rng(8)
  v = rng.random((3, 8, 8, 8)).astype(np.float32)
  v[:, :2] = 0.0
  f = ft.intensity_histogram_features(bins=8)(v)
  assert f.shape == (3, 9)
  np.testing.assert_allclose(f[:, :8].sum(1), 1.0)
  fg = v[0][v[0] > 0.05]
  expected = np.histogram(fg, bins=8, range=(0.05, 1.0))[0] / fg.size
  np.testing.assert_allclose(f[0, :8], expected, atol=1e-9)
  np.testing.assert_allclose(f[:, 8], (v > 0.05).mean(axis=(1, 2, 3)))


# --------------------------------------------------------------- diversity --


def test_pairwise_ms_ssim_and_diversity(cohort48):
  volumes = cohort48[0][:6]
  pairs = gm.pairwise_ms_ssim(volumes)
  assert pairs.shape == (15,) and np.all((pairs > 0.0) & (pairs < 1.0))
  subset = gm.pairwise_ms_ssim(volumes, max_pairs=4, seed=0)
  assert subset.shape == (4,)
  assert np.all(np.isin(subset.round(6), pairs.round(6)))
  collapsed = np.repeat(volumes[:1], 4, axis=0)
  div = gm.diversity(collapsed, volumes)
  assert div["generated_ms_ssim"] == pytest.approx(1.0, abs=1e-5)
  assert div["real_ms_ssim"] < 0.95 and div["difference"] > 0.0


# ------------------------------------------------------------- morphometry --


def _phantom(shape=32):
  """A sphere: CSF core (0.25), WM (0.9), GM rim (0.65), sulcal CSF shell."""
  grid = np.indices((shape,) * 3) - (shape - 1) / 2.0
  r = np.sqrt((grid**2).sum(0))
  v = np.zeros((shape,) * 3, np.float32)
  v[r < 13] = 0.25
  v[r < 12] = 0.65
  v[r < 10] = 0.9
  v[r < 4] = 0.25
  return v, r


def test_tissue_volumes_on_phantom():
  v, r = _phantom()
  out = ft.tissue_volumes(v[None])
  core, shell = (r < 4).sum(), ((r >= 12) & (r < 13)).sum()
  assert out["brain"][0] == (r < 13).sum()
  assert out["csf"][0] == core + shell
  assert out["gm"][0] == ((r >= 10) & (r < 12)).sum()
  assert out["wm"][0] == ((r >= 4) & (r < 10)).sum()
  assert out["ventricles"][0] == core  # sulcal shell is not central
  ml = ft.tissue_volumes(v[None], voxel_size=2.0)
  assert ml["brain"][0] == pytest.approx(out["brain"][0] * 8.0 / 1000.0)
  assert ml["csf_fraction"][0] == pytest.approx(out["csf_fraction"][0])


def test_csf_and_ventricles_grow_with_atrophy_stage(cohort48):
  volumes, stages = cohort48
  out = ft.tissue_volumes(volumes)
  for key in ("csf_fraction", "ventricle_fraction"):
    means = [out[key][stages == s].mean() for s in range(cohort.NUM_STAGES)]
    assert all(a < b for a, b in zip(means, means[1:])), (key, means)
  assert np.corrcoef(stages, out["ventricle_fraction"])[0, 1] > 0.7


def test_wasserstein_and_morphometry_distance(cohort48):
  rng = np.random.default_rng(9)
  x = rng.normal(size=50)
  assert gm.wasserstein_1(x, x + 0.7) == pytest.approx(0.7)
  y = rng.normal(size=30)
  assert gm.wasserstein_1(x, y) == pytest.approx(scipy.stats.wasserstein_distance(x, y))
  volumes, stages = cohort48
  early, late = volumes[stages == 0], volumes[stages == 3]
  same = gm.morphometry_distance(early, early)
  assert set(same) == set(gm.MORPHOMETRY_MEASURES)
  assert all(v == 0.0 for v in same.values())
  apart = gm.morphometry_distance(early, late)
  assert apart["ventricle_fraction"] > 0.01


# ------------------------------------------------------------ memorisation --


def test_nearest_neighbour_distances_match_brute_force():
  rng = np.random.default_rng(10)
  q = rng.random((5, 4, 4, 4)).astype(np.float32)
  r = rng.random((7, 4, 4, 4)).astype(np.float32)
  d, i = gm.nearest_neighbour_distances(q, r, batch_size=3)
  diff = q[:, None].astype(np.float64) - r[None]
  brute = np.sqrt((diff**2).mean(axis=(2, 3, 4)))
  np.testing.assert_allclose(d, brute.min(1), rtol=1e-12)
  np.testing.assert_array_equal(i, brute.argmin(1))


def test_memorisation_flags_copies_only(cohort48, conv_features):
  volumes, _ = cohort48
  train, held_out, others = volumes[:12], volumes[12:20], volumes[20:]
  rng = np.random.default_rng(11)
  noisy = np.clip(train[5] + 0.01 * rng.standard_normal(train[5].shape), 0, 1)
  generated = np.concatenate([train[2:3], noisy[None], others])
  rep = gm.memorisation_report(generated, train, held_out)
  assert rep["space"] == "voxel"
  np.testing.assert_array_equal(rep["flagged_indices"], [0, 1])
  np.testing.assert_array_equal(rep["generated_nn_index"][:2], [2, 5])
  assert rep["generated_to_train"][0] == 0.0
  assert rep["num_flagged"] == 2
  assert rep["fraction_flagged"] == pytest.approx(1 / 3)
  held = rep["held_out_to_train"]
  assert rep["privacy_threshold"] == pytest.approx(held.min())
  assert rep["generated_to_train"][2:].min() > rep["privacy_threshold"]
  assert rep["threshold_p5"] >= rep["privacy_threshold"]
  assert rep["chance_fraction"] == pytest.approx(1 / 9)
  feat = gm.memorisation_report(generated[:1], train, held_out, feature_fn=conv_features)
  assert feat["space"] == "feature" and list(feat["flagged_indices"]) == [0]


def test_memorisation_thresholds_are_percentiles_of_held_out_distances():
  """The privacy threshold is the minimum and `threshold_p5` the 5th percentile of the held-out
  scans' nearest-training distances, by `np.percentile` on a brute-force search; the fractions
  count generated samples below each."""
  rng = np.random.default_rng(12)
  train = rng.random((6, 3, 3, 3))
  held_out = rng.random((40, 3, 3, 3)) * rng.uniform(0.2, 1.5, (40, 1, 1, 1))
  generated = rng.random((30, 3, 3, 3)) * rng.uniform(0.2, 1.5, (30, 1, 1, 1))
  rep = gm.memorisation_report(generated, train, held_out)
  nearest = lambda a: np.sqrt(((a[:, None] - train[None]) ** 2).mean(axis=(2, 3, 4))).min(1)
  held, gen = nearest(held_out), nearest(generated)
  p5 = np.percentile(held, 5)
  assert rep["threshold_p5"] == pytest.approx(p5, rel=1e-6)  # volumes are read as float32
  assert rep["privacy_threshold"] == pytest.approx(held.min(), rel=1e-6)
  assert rep["fraction_below_p5"] == pytest.approx(np.mean(gen < p5))
  assert rep["fraction_flagged"] == pytest.approx(np.mean(gen < held.min()))
  assert np.percentile(held, 95) > 1.5 * p5  # another percentile would not pass


# --------------------------------------------------------------- bootstrap --


def test_bootstrap_ci_of_mean():
  x = np.random.default_rng(12).normal(size=400)
  low, high = gm.bootstrap_ci(x, num_resamples=1000, seed=0)
  assert low < 0.0 < high
  expected = 2 * 1.96 * x.std() / np.sqrt(len(x))
  assert high - low == pytest.approx(expected, rel=0.15)
  assert gm.bootstrap_ci(x, seed=0) == (low, high)  # deterministic


def test_bootstrap_ci_coverage():
  rng = np.random.default_rng(13)
  hits = [
    lo < 0.0 < hi
    for lo, hi in (
      gm.bootstrap_ci(rng.normal(size=100), num_resamples=300, seed=k) for k in range(100)
    )
  ]
  assert 0.85 <= np.mean(hits) <= 1.0


def test_bootstrap_ci_two_sample_statistics():
  rng = np.random.default_rng(14)
  a, b = rng.normal(size=300), rng.normal(size=200) + 1.0
  low, high = gm.bootstrap_ci(lambda x, y: y.mean() - x.mean(), a, b, num_resamples=500)
  assert low < 1.0 < high
  fa, fb = rng.normal(size=(60, 3)), rng.normal(size=(60, 3)) + 1.0
  low, high = gm.bootstrap_ci(gm.frechet_distance, fa, fb, num_resamples=100)
  assert 0.0 < low < gm.frechet_distance(fa, fb) < high
  with pytest.raises(ValueError):
    gm.bootstrap_ci(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_threshold_matches_skimage_half_a_bin_up(seed):
  """skimage returns the centre of the last bin of the lower class; this returns its upper edge."""
  filters = pytest.importorskip("skimage.filters", reason="scikit-image gives the reference")
  rng = np.random.default_rng(seed)
  values = np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7 + 0.05 * seed, 0.1, 5000)])
  half_bin = 0.5 * (values.max() - values.min()) / 256
  assert ft.otsu_threshold(values) == pytest.approx(
    filters.threshold_otsu(values, nbins=256) + half_bin, abs=1e-9
  )
  assert ft.otsu_threshold(np.full(5, 3.0)) == 3.0  # constant input: its value

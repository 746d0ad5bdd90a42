"""Tests for latentfm.metrics.image: exact formulas, parity with skimage and
pytorch_msssim, and SSIM / MS-SSIM properties."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from latentfm.metrics import image as im

SKIMAGE_REASON = "scikit-image is needed for the SSIM/PSNR parity tests"
MSSSIM_REASON = "pytorch-msssim (and torch) are needed for the MS-SSIM parity test"


def _smooth(shape, seed=0):
  """A smooth random volume in [0, 1]."""
  rng = np.random.default_rng(seed)
  v = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0, axes=(-3, -2, -1))
  v = (v - v.min()) / (v.max() - v.min())
  return v.astype(np.float32)


def _pair(shape, seed=0, noise=(0.02, 0.08)):
  """(reference + small noise, reference + more noise), float32 in [0, 1]."""
  rng = np.random.default_rng(seed + 1)
  ref = _smooth(shape, seed)
  x, y = (np.clip(ref + s * rng.standard_normal(shape), 0, 1).astype(np.float32) for s in noise)
  return x, y


def test_mse_nmse_psnr_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.random((3, 6, 7, 8)).astype(np.float32)
  y = rng.random((3, 6, 7, 8)).astype(np.float32)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  ref_mse = ((x64 - y64) ** 2).mean(axis=(1, 2, 3))
  ref_nmse = ((x64 - y64) ** 2).sum(axis=(1, 2, 3)) / (y64**2).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(im.mse(x, y), ref_mse, rtol=1e-6)
  np.testing.assert_allclose(im.nmse(x, y), ref_nmse, rtol=1e-6)
  np.testing.assert_allclose(im.psnr(x, y), 10 * np.log10(1.0 / ref_mse), rtol=1e-6)
  np.testing.assert_allclose(im.psnr(x, y, data_range=2.0), 10 * np.log10(4.0 / ref_mse), rtol=1e-6)
  # In float64 the agreement is to rounding.
  with jax.enable_x64(True):
    np.testing.assert_allclose(im.mse(x64, y64), ref_mse, rtol=1e-13)
    np.testing.assert_allclose(im.nmse(x64, y64), ref_nmse, rtol=1e-13)
  # NMSE normalises by the reference (second argument): 0 for a perfect match,
  # 1 for an all-zero prediction, not symmetric.
  np.testing.assert_allclose(im.nmse(np.zeros_like(y), y), 1.0, rtol=1e-6)
  assert not np.allclose(im.nmse(x, y), im.nmse(y, x))
  assert np.all(np.isinf(im.psnr(x, x)))


def test_psnr_matches_skimage():
  metrics = pytest.importorskip("skimage.metrics", reason=SKIMAGE_REASON)
  x, y = _pair((2, 10, 12, 14))
  ours = np.asarray(im.psnr(x, y))
  ref = [metrics.peak_signal_noise_ratio(y[i], x[i], data_range=1.0) for i in range(2)]
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize(
  "shape,sigma,win_size,data_range",
  [
    ((24, 28, 32), 1.5, 11, 1.0),  # skimage default window for sigma 1.5
    ((24, 24, 24), 1.0, 9, 2.0),  # 2 * int(3.5 * 1.0 + 0.5) + 1 = 9
  ],
)
def test_ssim_matches_skimage(shape, sigma, win_size, data_range):
  metrics = pytest.importorskip("skimage.metrics", reason=SKIMAGE_REASON)
  x, y = _pair((2, *shape), seed=len(shape) + win_size)
  x, y = x * data_range, y * data_range
  ours = np.asarray(im.ssim(x, y, data_range=data_range, sigma=sigma, win_size=win_size))
  ref = np.array(
    [
      metrics.structural_similarity(
        x[i].astype(np.float64),
        y[i].astype(np.float64),
        data_range=data_range,
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        channel_axis=None,
      )
      for i in range(2)
    ]
  )
  assert 0.2 < ref.min() < ref.max() < 0.99  # a non-trivial regime
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
  "shape,win_size",
  [
    ((48, 48, 48), 3),  # 5 scales, standard weights used as given
    ((24, 40, 48), 3),  # 4 scales: first 4 weights renormalised
    ((40, 72, 72), 5),  # 4 scales with a wider window
  ],
)
def test_ms_ssim_matches_pytorch_msssim(shape, win_size):
  """pytorch_msssim uses valid Gaussian convolution (= our convention), pools
  with zero padding at odd sides and asserts min(H, W) > 16 (win_size - 1), so
  the shapes have H, W above that bound and even sides at every pooling step."""
  torch = pytest.importorskip("torch", reason=MSSSIM_REASON)
  pms = pytest.importorskip("pytorch_msssim", reason=MSSSIM_REASON)
  x, y = _pair((2, *shape), seed=win_size)
  num_scales, win = im.ms_ssim_scales(shape, win_size)
  assert win == win_size
  weights = np.asarray(im.MS_SSIM_WEIGHTS[:num_scales], np.float64)
  if num_scales < 5:
    weights = weights / weights.sum()
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # Depthwise conv3d oversubscribes small CPU hosts.
  try:
    ref = pms.ms_ssim(
      torch.from_numpy(x[:, None].astype(np.float64)),
      torch.from_numpy(y[:, None].astype(np.float64)),
      data_range=1.0,
      size_average=False,
      win_size=win_size,
      win_sigma=1.5,
      weights=weights.tolist(),
    ).numpy()
  finally:
    torch.set_num_threads(threads)
  ours = np.asarray(im.ms_ssim(x, y, win_size=win_size))
  assert 0.3 < ref.min() < ref.max() < 0.999
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_ms_ssim_scales_rule():
  assert im.ms_ssim_scales((64, 64, 64)) == (3, 11)
  assert im.ms_ssim_scales((128, 128, 128)) == (4, 11)
  assert im.ms_ssim_scales((176, 176, 176)) == (5, 11)
  assert im.ms_ssim_scales((175, 200, 200)) == (4, 11)  # 175 // 16 = 10 < 11
  assert im.ms_ssim_scales((400, 400, 400)) == (5, 11)
  assert im.ms_ssim_scales((400, 400, 400), max_scales=3) == (3, 11)
  assert im.ms_ssim_scales((8, 64, 64)) == (1, 7)
  assert im.ms_ssim_scales((9, 64, 64)) == (1, 9)
  assert im.ms_ssim_scales((24, 40, 48), win_size=3) == (4, 3)


def test_ms_ssim_combines_ssim_scales():
  """Truncated, renormalised weights on a 3-scale volume, rebuilt from ssim()."""
  x, y = _pair((2, 20, 22, 24), seed=5)
  assert im.ms_ssim_scales(x.shape[1:], 5) == (3, 5)
  w = np.asarray(im.MS_SSIM_WEIGHTS[:3]) / np.sum(im.MS_SSIM_WEIGHTS[:3])
  expected, xs, ys = 1.0, x, y
  for j in range(3):
    s, cs = (np.asarray(v) for v in im.ssim(xs, ys, win_size=5, return_cs=True))
    expected = expected * np.maximum(s if j == 2 else cs, 0) ** w[j]
    xs, ys = (
      a[:, : a.shape[1] // 2 * 2, : a.shape[2] // 2 * 2, : a.shape[3] // 2 * 2] for a in (xs, ys)
    )
    xs, ys = (
      a.reshape(2, a.shape[1] // 2, 2, a.shape[2] // 2, 2, a.shape[3] // 2, 2).mean(axis=(2, 4, 6))
      for a in (xs, ys)
    )
  np.testing.assert_allclose(im.ms_ssim(x, y, win_size=5), expected, rtol=1e-5)


def test_identity_symmetry_and_channel_axis():
  x, y = _pair((2, 20, 20, 20), seed=3)
  np.testing.assert_allclose(im.ssim(x, x), 1.0, atol=1e-6)
  np.testing.assert_allclose(im.ms_ssim(x, x, win_size=5), 1.0, atol=1e-6)
  np.testing.assert_allclose(im.ssim(x, y), im.ssim(y, x), atol=1e-6)
  np.testing.assert_allclose(im.ms_ssim(x, y, win_size=5), im.ms_ssim(y, x, win_size=5), atol=1e-6)
  np.testing.assert_allclose(im.ssim(x[..., None], y[..., None]), im.ssim(x, y))
  np.testing.assert_allclose(im.psnr(x[..., None], y[..., None]), im.psnr(x, y))
  # A brightness shift changes only the luminance term: cs stays 1.
  s, cs = im.ssim(x + 0.2, x, return_cs=True)
  assert s.shape == cs.shape == (2,)
  np.testing.assert_allclose(cs, 1.0, atol=1e-4)
  assert np.all(np.asarray(s) < 0.99)


def test_metrics_degrade_with_noise():
  ref = _smooth((1, 20, 20, 20), seed=7)
  rng = np.random.default_rng(0)
  eps = rng.standard_normal(ref.shape).astype(np.float32)
  noisy = np.concatenate([ref + s * eps for s in (0.01, 0.03, 0.1, 0.3)])
  refs = np.repeat(ref, 4, axis=0)
  for metric in (im.ssim, im.psnr, lambda a, b: im.ms_ssim(a, b, win_size=5)):
    assert np.all(np.diff(np.asarray(metric(noisy, refs))) < 0)
  assert np.all(np.diff(np.asarray(im.mse(noisy, refs))) > 0)
  assert np.all(np.diff(np.asarray(im.nmse(noisy, refs))) > 0)


def test_batched_equals_per_volume_and_jit():
  x, y = _pair((3, 20, 20, 20), seed=11)
  fns = {
    "mse": im.mse,
    "nmse": im.nmse,
    "psnr": im.psnr,
    "ssim": im.ssim,
    "ms_ssim": lambda a, b: im.ms_ssim(a, b, win_size=5),
  }
  for name, fn in fns.items():
    batched = np.asarray(fn(x, y))
    single = np.concatenate([np.asarray(fn(x[i : i + 1], y[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(batched, single, rtol=1e-6, err_msg=name)
    jitted = jax.jit(fn)(x, y)
    np.testing.assert_allclose(jitted, batched, rtol=1e-6, err_msg=name)
  # data_range may be traced.
  dr = jax.jit(lambda a, b, r: im.ssim(a, b, data_range=r))(x, y, 1.0)
  np.testing.assert_allclose(dr, im.ssim(x, y), rtol=1e-6)


def test_invalid_inputs():
  x = np.zeros((1, 8, 8, 8), np.float32)
  with pytest.raises(ValueError, match="Shape mismatch"):
    im.mse(x, x[:, :4])
  with pytest.raises(ValueError, match="Expected"):
    im.ssim(x[0], x[0])
  with pytest.raises(ValueError, match="odd"):
    im.ssim(x, x, win_size=4)
  with pytest.raises(ValueError, match="exceeds"):
    im.ssim(x, x, win_size=11)


def test_gaussian_window_is_the_normalised_sampled_gaussian():
  g = im.gaussian_window(11, 1.5)
  t = np.arange(-5, 6)
  np.testing.assert_allclose(g, np.exp(-(t**2) / 4.5) / np.exp(-(t**2) / 4.5).sum(), rtol=1e-12)
  assert g.argmax() == 5 and g.sum() == pytest.approx(1.0)
  for bad in (0, 4):
    with pytest.raises(ValueError, match="positive odd"):
      im.gaussian_window(bad, 1.5)

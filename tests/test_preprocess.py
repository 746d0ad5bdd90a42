import numpy as np
import pytest
from testing_support import blob_volume

from latentfm.data import preprocess as pp
from latentfm.data.io import Volume, VolumeError


def test_resample_to_target_spacing_keeps_geometry():
  vol = Volume(blob_volume((10, 12, 8)), spacing=(2.0, 2.0, 2.0), origin=(1.0, 2.0, 3.0))
  out = pp.resample(vol, 1.0)
  assert out.array.shape == (20, 24, 16)
  assert out.spacing == (1.0, 1.0, 1.0) and out.origin == vol.origin
  assert out.direction == vol.direction
  assert pp.resample(vol, 2.0) is vol  # already at the target spacing


def test_resample_is_linear_on_a_ramp():
  ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, None, :], (4, 4, 8)).copy()
  out = pp.resample(Volume(ramp, spacing=(1.0, 1.0, 1.0)), (0.5, 1.0, 1.0)).array
  assert out.shape == (4, 4, 16)
  np.testing.assert_allclose(out[0, 0, 1:14:2], np.arange(0.5, 7, 1.0), atol=1e-5)


def test_normalize_intensity_percentiles():
  arr = np.zeros((10, 10, 10), np.float32)
  arr[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
  out = pp.normalize_intensity(arr, 0.0, 100.0)
  assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32
  out = pp.normalize_intensity(arr, 10.0, 90.0)
  assert np.isclose((out == 1.0).mean() * 1000, 22, atol=1)  # the top 10% of 216 clip to 1
  with pytest.raises(VolumeError):
    pp.normalize_intensity(np.ones((4, 4, 4)))


def test_crop_foreground_and_empty():
  arr = np.zeros((20, 20, 20), np.float32)
  arr[5:9, 3:15, 10:12] = 1.0
  assert pp.crop_foreground(arr, margin=1).shape == (6, 14, 4)
  assert pp.foreground_box(arr, margin=0) == (slice(5, 9), slice(3, 15), slice(10, 12))
  with pytest.raises(VolumeError, match="no voxel above"):
    pp.crop_foreground(np.zeros((4, 4, 4)))


def test_pad_or_crop_to_cube_centres():
  arr = np.ones((4, 6, 2), np.float32)
  cube = pp.pad_or_crop_to_cube(arr)
  assert cube.shape == (6, 6, 6) and cube.sum() == arr.sum()
  assert cube[1:5, :, 2:4].sum() == arr.sum()
  assert pp.pad_or_crop_to_cube(np.ones((8, 8, 8)), 4).shape == (4, 4, 4)


def test_resize_shape_and_constant():
  out = pp.resize(np.full((30, 20, 25), 0.5, np.float32), (16, 16, 16))
  assert out.shape == (16, 16, 16)
  np.testing.assert_allclose(out, 0.5, atol=1e-6)
  assert pp.resize(blob_volume((16, 16, 16)), (16, 16, 16)).shape == (16, 16, 16)


def test_preprocess_volume_pipeline():
  vol = Volume(blob_volume((20, 24, 16)), spacing=(2.0, 1.0, 1.5))
  out = pp.preprocess_volume(vol, (16, 16, 16), spacing=1.0)
  assert out.shape == (16, 16, 16) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.8
  border = np.concatenate([out[0].ravel(), out[-1].ravel()])
  assert border.mean() < out.mean()  # background stays at the border
  with pytest.raises(VolumeError, match="scan.nii: volume is constant"):
    pp.preprocess_volume(Volume(np.ones((8, 8, 8), np.float32)), (8, 8, 8), name="scan.nii")


def test_augment_flips_and_scales():
  arr = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
  seen_flip = seen_plain = False
  for seed in range(20):
    out = pp.augment(arr, np.random.default_rng(seed), flip_axes=(2,), intensity_range=(0.7, 1.0))
    ratio = out.sum() / arr.sum()
    assert 0.7 <= ratio <= 1.0
    base = arr * (out.max() / arr.max())
    if np.allclose(out, base[:, :, ::-1], atol=1e-5):
      seen_flip = True
    elif np.allclose(out, base, atol=1e-5):
      seen_plain = True
    else:
      raise AssertionError("augment did more than flip and scale")
  assert seen_flip and seen_plain
  a = pp.augment(arr, np.random.default_rng(3))
  b = pp.augment(arr, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)


def test_train_val_split_deterministic():
  train, val = pp.train_val_split(40, 0.2, seed=0)
  assert len(train) == 32 and len(val) == 8
  assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(40))
  train2, val2 = pp.train_val_split(40, 0.2, seed=0)
  np.testing.assert_array_equal(val, val2)
  _, val3 = pp.train_val_split(40, 0.2, seed=1)
  assert set(val3) != set(val)
  with pytest.raises(ValueError):
    pp.train_val_split(1)
  with pytest.raises(ValueError):
    pp.train_val_split(10, 1.5)


def _ball(shape, spacing_zyx, radius_mm=16.0):
  """A ball of `radius_mm`, brightest at its centre and fading smoothly to 0 at its surface, in
  a (D, H, W) grid of `spacing_zyx` mm voxels."""
  axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_zyx)]
  r = np.sqrt(sum(g**2 for g in np.meshgrid(*axes, indexing="ij")))
  return (100.0 * np.maximum(0.0, 1.0 - (r / radius_mm) ** 2)).astype(np.float32)


def test_preprocess_volume_resamples_anisotropic_voxels():
  """A ball scanned with 4 x 2 x 1 mm voxels comes out as the same ball scanned with 1 mm
  ones: the pipeline resamples to the target spacing before cropping and resizing."""
  spacing_zyx = (4.0, 2.0, 1.0)
  scan = Volume(_ball((10, 20, 40), spacing_zyx), spacing=spacing_zyx[::-1])  # spacing is x, y, z
  iso = Volume(_ball((40, 40, 40), (1.0, 1.0, 1.0)), spacing=(1.0, 1.0, 1.0))
  out = pp.preprocess_volume(scan, (16, 16, 16), spacing=1.0)
  want = pp.preprocess_volume(iso, (16, 16, 16), spacing=1.0)
  assert np.abs(out - want).mean() < 0.05
  unresampled = pp.preprocess_volume(scan, (16, 16, 16), spacing=None)
  assert np.abs(unresampled - want).mean() > 0.12  # the voxel grid alone is a flat ellipsoid
  swapped = pp.preprocess_volume(Volume(scan.array, spacing=spacing_zyx), (16, 16, 16))
  assert np.abs(swapped - want).mean() > 0.12  # and so is the spacing read in array order

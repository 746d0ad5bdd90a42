import numpy as np
import pytest

from latentfm import viz


def test_mid_slices_planes():
  vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  axial, coronal, sagittal = viz.mid_slices(vol)
  np.testing.assert_array_equal(axial, vol[2])
  np.testing.assert_array_equal(coronal, vol[::-1, 2, :])
  np.testing.assert_array_equal(sagittal, vol[::-1, :, 3])


def test_triplanar_image_mosaic_shape():
  img = viz.triplanar_image(np.zeros((3, 8, 8, 8, 1)), pad=2)
  assert img.shape == (3 * 10, 3 * 10)
  with pytest.raises(ValueError, match="volumes"):
    viz.triplanar_image(np.zeros((2, 3)))


def test_save_triplanar_writes_png(tmp_path):
  import matplotlib.image as mpimg

  path = viz.save_triplanar(
    str(tmp_path / "sub" / "p.png"), np.random.rand(2, 8, 8, 8), row_labels=["a", "b"], title="t"
  )
  img = mpimg.imread(path)
  assert img.shape[0] > 100 and img.shape[1] > 100
  with pytest.raises(ValueError, match="row labels"):
    viz.save_triplanar(str(tmp_path / "q.png"), np.zeros((2, 4, 4, 4)), row_labels=["a"])


def test_slices_at_fractional_position():
  vol = np.random.rand(10, 10, 10)
  axial, coronal, sagittal = viz.mid_slices(vol, at=(0.0, 0.99, 0.3))
  np.testing.assert_array_equal(axial, vol[0])
  np.testing.assert_array_equal(coronal, vol[::-1, 9, :])
  np.testing.assert_array_equal(sagittal, vol[::-1, :, 3])


def test_grid_of_volumes(tmp_path):
  grid = np.random.default_rng(0).uniform(size=(3, 4, 8, 8, 8)).astype(np.float32)
  path = viz.save_grid(str(tmp_path / "g.png"), grid, ["a", "b", "c"], list("wxyz"), title="t")
  from matplotlib.image import imread  # pylint: disable=import-outside-toplevel

  assert imread(path).shape[:2] == (1020, 680)  # 3 x 2 plane rows, 4 columns of 1.6 in at 100 dpi
  with pytest.raises(ValueError, match=r"\[3, 4, D, H, W\]"):
    viz.save_grid(str(tmp_path / "bad.png"), grid[:, :3], ["a", "b", "c"], list("wxyz"))
  with pytest.raises(ValueError, match="planes"):
    viz.save_grid(str(tmp_path / "bad.png"), grid, ["a", "b", "c"], list("wxyz"), planes=["up"])
  assert not (tmp_path / "bad.png").exists()

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from testing_support import blob_volume

from latentfm.data.io import Volume, VolumeError, is_volume_file, read_volume, write_volume

DIRECTION = tuple(np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float).ravel())


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".nrrd"])
def test_round_trip_keeps_values_and_geometry(tmp_path, suffix):
  vol = Volume(
    blob_volume(), spacing=(1.5, 2.0, 0.75), origin=(-10.0, 5.5, 3.0), direction=DIRECTION
  )
  path = tmp_path / f"v{suffix}"
  write_volume(path, vol)
  back = read_volume(path)
  np.testing.assert_array_equal(back.array, vol.array)
  assert back.array.dtype == np.float32 and back.array.shape == (12, 14, 10)
  np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
  np.testing.assert_allclose(back.origin, vol.origin, atol=1e-5)
  np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)


def test_write_bare_array_with_spacing(tmp_path):
  write_volume(tmp_path / "a.nii.gz", blob_volume(), spacing=(1.0, 1.0, 3.0))
  assert read_volume(tmp_path / "a.nii.gz").spacing == (1.0, 1.0, 3.0)


def test_is_volume_file():
  assert is_volume_file("a/B.NII.GZ") and is_volume_file("x.nrrd")
  assert not is_volume_file("manifest.csv") and not is_volume_file("x.png")


def test_missing_file(tmp_path):
  with pytest.raises(VolumeError, match="no such file"):
    read_volume(tmp_path / "nope.nii.gz")


def test_corrupt_file_names_the_file(tmp_path):
  path = tmp_path / "corrupt.nii.gz"
  path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
  with pytest.raises(VolumeError, match="corrupt.nii.gz: cannot read"):
    read_volume(path)


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".nrrd", ".nii.gz"])
def test_truncated_file(tmp_path, suffix):
  path = tmp_path / f"trunc{suffix}"
  write_volume(path, blob_volume((20, 20, 20)))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(VolumeError, match=f"trunc{suffix}"):
    read_volume(path)


def test_2d_image_rejected(tmp_path):
  path = tmp_path / "slice.nii.gz"
  sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 8).astype(np.float32)), str(path))
  with pytest.raises(VolumeError, match="slice.nii.gz: expected a 3D volume, got a 2D"):
    read_volume(path)


def test_4d_image_rejected(tmp_path):
  path = tmp_path / "series.nii.gz"
  image = sitk.JoinSeries([sitk.GetImageFromArray(blob_volume(seed=i)) for i in range(3)])
  sitk.WriteImage(image, str(path))
  with pytest.raises(VolumeError, match="series.nii.gz: expected a 3D volume, got a 4D"):
    read_volume(path)


def test_nan_and_constant_rejected(tmp_path):
  arr = blob_volume()
  arr[3, 3, 3] = np.nan
  write_volume(tmp_path / "nan.mha", arr)  # NIfTI via ITK maps NaN to 0
  with pytest.raises(VolumeError, match="nan.mha: volume contains 1 NaN/Inf"):
    read_volume(tmp_path / "nan.mha")
  write_volume(tmp_path / "flat.mha", np.full((6, 6, 6), 3.0, np.float32))
  with pytest.raises(VolumeError, match="flat.mha: volume is constant"):
    read_volume(tmp_path / "flat.mha")


def test_unsupported_suffix(tmp_path):
  with pytest.raises(VolumeError, match="unsupported suffix"):
    write_volume(tmp_path / "x.png", blob_volume())

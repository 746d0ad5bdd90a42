"""NIfTI files as FSL/SPM and real pipelines write them: NaN outside the mask, and direction
cosines that are orthonormal only up to float rounding (both mishandled by SimpleITK alone)."""

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from testing_support import blob_volume

from latentfm.data.io import VolumeError, read_volume


def write_nifti(path, array_zyx, affine, qform=True):
  image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
  image.set_sform(affine, code=1)
  image.set_qform(affine if qform else None, code=1 if qform else 0)
  nib.save(image, str(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nan_in_nifti_is_rejected_or_zeroed_and_counted(tmp_path, suffix, caplog):
  arr = blob_volume()
  arr[0, 0, :3] = np.nan
  arr[1, 1, 1] = np.inf
  path = tmp_path / f"fsl{suffix}"
  write_nifti(path, arr, np.diag([2.0, 2.0, 2.0, 1.0]))
  assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # what ITK does
  with pytest.raises(VolumeError, match=f"fsl{suffix}: volume contains 4 NaN/Inf voxels"):
    read_volume(path)
  with caplog.at_level(logging.WARNING):
    volume = read_volume(path, nonfinite="zero")
  assert f"fsl{suffix}: replaced 4 NaN/Inf voxels with 0" in caplog.text
  expected = np.where(np.isfinite(arr), arr, 0)
  np.testing.assert_array_equal(volume.array, expected)
  assert volume.spacing == (2.0, 2.0, 2.0)


def test_nearly_orthonormal_direction_is_read_with_a_warning(tmp_path, caplog):
  affine = np.eye(4)
  affine[:3, :3] = [[1.5, 0.003, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 1.5]]
  affine[:3, 3] = [10.0, -20.0, 30.0]
  path = tmp_path / "rounded.nii.gz"
  arr = blob_volume()
  write_nifti(path, arr, affine, qform=False)
  with pytest.raises(RuntimeError, match="orthonormal"):
    sitk.ReadImage(str(path))  # what ITK does
  with caplog.at_level(logging.WARNING):
    volume = read_volume(path)
  assert "rounded.nii.gz: direction cosines deviate from orthonormal by 0.001" in caplog.text
  np.testing.assert_array_equal(volume.array, arr)
  direction = np.asarray(volume.direction).reshape(3, 3)
  np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(direction, np.diag([-1.0, -1.0, 1.0]), atol=2e-3)  # RAS -> LPS
  np.testing.assert_allclose(volume.origin, (-10.0, 20.0, 30.0))
  np.testing.assert_allclose(volume.spacing, (1.5, 1.5, 1.5), atol=1e-5)


def test_sheared_direction_is_refused(tmp_path):
  affine = np.eye(4)
  affine[0, 1] = 0.2
  write_nifti(tmp_path / "sheared.nii", blob_volume(), affine, qform=False)
  with pytest.raises(VolumeError, match="sheared.nii: direction cosines are not orthonormal"):
    read_volume(tmp_path / "sheared.nii")

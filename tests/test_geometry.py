"""True geometry: preprocessed volumes record their voxel size, samples are written with it."""

import json

import ml_collections
import numpy as np
import pytest
import SimpleITK as sitk

from latentfm import sample
from latentfm.data import geometry, loader
from latentfm.data.io import Volume, write_volume

# A head-sized ellipsoid: full extents along the image's x, y, z axes in mm.
EXTENT_MM = np.array([140.0, 180.0, 120.0])
FLIPPED_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def ellipsoid_scan(spacing_xyz, seed=0) -> Volume:
  """The ellipsoid (intensity 100 with noise, background 0) on a grid of `spacing_xyz` mm with
  a 10 mm margin, direction cosines flipping x and y."""
  spacing = np.asarray(spacing_xyz, float)
  size_xyz = np.ceil((EXTENT_MM + 20.0) / spacing).astype(int)
  axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size_xyz, spacing)]
  x, y, z = np.meshgrid(*axes, indexing="ij")
  inside = (x / 70.0) ** 2 + (y / 90.0) ** 2 + (z / 60.0) ** 2 <= 1.0
  noise = np.random.default_rng(seed).normal(0.0, 10.0, inside.shape)
  array = np.where(inside, 100.0 + noise, 0.0).astype(np.float32).transpose(2, 1, 0)
  return Volume(
    array=array, spacing=tuple(spacing), origin=(10.0, -20.0, 5.0), direction=FLIPPED_XY
  )


def physical_extent(image: sitk.Image, threshold: float = 0.25) -> np.ndarray:
  """Extent in mm (x, y, z) of the voxels above `threshold` (half the interior's level)."""
  mask = sitk.GetArrayFromImage(image) > threshold  # (z, y, x)
  extent = []
  for axis_xyz in range(3):
    axis = 2 - axis_xyz
    hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    extent.append((hits[-1] - hits[0] + 1) * image.GetSpacing()[axis_xyz])
  return np.asarray(extent)


@pytest.mark.parametrize("resample_mm", [2.0, None])
def test_preprocessed_scan_written_back_has_its_physical_size(tmp_path, resample_mm):
  """Preprocessed to 32³ (resampled to 2 mm, or kept at its anisotropic voxels), then written
  as a sample: SimpleITK reads the ellipsoid at its size in mm, in the scan's orientation, with
  its centre at the origin. At 1 mm voxels it would measure about 32 mm."""
  folder = tmp_path / "scans"
  folder.mkdir()
  write_volume(str(folder / "head.nii.gz"), ellipsoid_scan((1.5, 1.2, 2.0)))
  data = loader.load_dataset(str(folder), (32, 32, 32), resample_mm)
  geo = data.geometry()
  voxel = geo.spacing
  if resample_mm:  # a 2 mm cube of ~(180 + margin) mm, resized to 32 voxels: isotropic
    assert np.allclose(voxel, voxel[0]) and 5.5 < voxel[0] < 6.5
  else:  # the cube is square in voxels, so its voxels keep the scan's anisotropy
    np.testing.assert_allclose(np.asarray(voxel) / voxel[0], [1.0, 1.2 / 1.5, 2.0 / 1.5])
  assert geo.direction == FLIPPED_XY and geo.num_volumes == geo.agreeing == 1
  [path] = sample.write_samples(str(tmp_path / "out"), data.volumes, geometry=geo)
  image = sitk.ReadImage(path)
  np.testing.assert_allclose(image.GetSpacing(), voxel, rtol=1e-5)
  np.testing.assert_allclose(image.GetDirection(), FLIPPED_XY, atol=1e-6)
  centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
  np.testing.assert_allclose(centre, 0.0, atol=1e-3)
  extent = physical_extent(image)
  print(f"voxel {np.round(voxel, 3)} mm; extent {np.round(extent, 1)} mm, true {EXTENT_MM}")
  # Within 1.5 voxels: whole voxels at each edge, blurred by the resize's anti-aliasing.
  assert np.all(np.abs(extent - EXTENT_MM) <= 1.5 * np.asarray(voxel)), extent


def test_summary_takes_the_median_and_the_commonest_direction(caplog):
  spacings = np.array([[2.0, 2.0, 2.0], [3.0, 2.5, 2.0], [9.0, 2.0, 4.0]])
  directions = np.array([FLIPPED_XY, FLIPPED_XY, geometry.IDENTITY])
  with caplog.at_level("WARNING", logger="latentfm"):
    geo = geometry.summarise(spacings, directions + 1e-5)  # rounding noise is the same direction
  assert geo.spacing == (3.0, 2.0, 2.0)
  np.testing.assert_allclose(geo.direction, FLIPPED_XY, atol=1e-4)
  assert (geo.num_volumes, geo.agreeing, geo.orientation) == (3, 2, "RAS")
  assert "2 different orientations" in caplog.text
  assert geometry.Geometry.from_dict(json.loads(json.dumps(geo.to_dict()))) == geo
  with pytest.raises(ValueError, match="need"):
    geometry.summarise(np.zeros((0, 3)), np.zeros((0, 9)))


def test_training_split_geometry_is_recorded_in_the_workdir(volume_dir, tmp_path):
  """The training run's `load_splits` writes geometry.json; a reading caller does not."""
  c = ml_collections.ConfigDict(
    {
      "dir": str(volume_dir),
      "shape": (8, 8, 8),
      "spacing": 2.0,
      "val_fraction": 0.4,
      "split_seed": 0,
    }
  )
  reader = str(tmp_path / "reader")
  loader.load_splits(c, reader)
  assert geometry.read(reader) is None
  workdir = str(tmp_path / "w")
  train, _ = loader.load_splits(c, workdir, on_change=lambda line: None)
  recorded = geometry.read(workdir)
  assert recorded == train.geometry() and recorded.num_volumes == len(train.names) == 3
  # The blobs' foreground is 10 voxels wide at most; with the crop's 1-voxel margins a cube of
  # 12 voxels of 2 mm, resized to 8: 3 mm.
  assert recorded.spacing == (3.0, 3.0, 3.0), recorded
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / geometry.GEOMETRY_FILE).write_text("[1, 2]")
  with pytest.raises(ValueError, match="geometry.json: not a geometry record"):
    geometry.read(str(tmp_path / "bad"))

"""Data folders as users hand them over: manifests from spreadsheets, several bad files at
once, symbolic-link loops, and scans added to a folder a run was trained on."""

import os

import ml_collections
import numpy as np
import pytest
from testing_support import blob_volume

from latentfm.data import loader, split_record
from latentfm.data.io import ManyErrors, VolumeError, write_volume
from latentfm.data.preprocess import train_val_split


def write_manifest(directory, text, bom=False):
  (directory / "manifest.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())


def test_manifest_with_bom_and_spaced_header_is_read(volume_dir):
  write_manifest(volume_dir, "File , stage\nscan_0.nii.gz, 1\n scan_1.nii.gz ,2\n\n", bom=True)
  items = loader.index_directory(str(volume_dir))
  assert [(os.path.basename(p), l) for p, l in items] == [
    ("scan_0.nii.gz", 1),
    ("scan_1.nii.gz", 2),
  ]


def test_duplicate_manifest_row_is_refused_with_line_numbers(volume_dir):
  write_manifest(volume_dir, "file,stage\nscan_0.nii.gz,0\nscan_1.nii.gz,1\n./scan_0.nii.gz,1\n")
  with pytest.raises(
    VolumeError,
    match=r"manifest.csv line 4: './scan_0.nii.gz' is already "
    r"listed on line 2",
  ):
    loader.index_directory(str(volume_dir))


def test_every_bad_file_is_listed_at_once_or_skipped(volume_dir, tmp_path):
  (volume_dir / "broken.nii.gz").write_bytes(b"not a volume")
  write_volume(str(volume_dir / "flat.nii.gz"), np.ones((6, 6, 6), np.float32))
  os.symlink("loop_b.nii.gz", volume_dir / "loop_a.nii.gz")
  os.symlink("loop_a.nii.gz", volume_dir / "loop_b.nii.gz")
  with pytest.raises(ManyErrors) as info:
    loader.load_dataset(str(volume_dir), (8, 8, 8), 1.0, cache_dir=str(tmp_path / "cache"))
  lines = str(info.value).splitlines()
  assert lines[0].startswith(f"4 of 9 files in {volume_dir} are unusable")
  assert "skip_bad_files" in lines[0] and len(lines) == 5
  for name in ("broken.nii.gz", "flat.nii.gz", "loop_a.nii.gz", "loop_b.nii.gz"):
    assert sum(name + ":" in l for l in lines[1:]) == 1, name
  assert not (tmp_path / "cache").exists()
  for _ in range(2):  # computed, then from the cache
    ds = loader.load_dataset(
      str(volume_dir), (8, 8, 8), 1.0, cache_dir=str(tmp_path / "cache"), skip_bad_files=True
    )
    assert ds.names == tuple(f"scan_{i}.nii.gz" for i in range(5)) and len(ds.volumes) == 5
    assert len(ds.skipped) == 4


def data_config(directory, **changes):
  c = ml_collections.ConfigDict(
    {
      "dir": str(directory),
      "shape": (8, 8, 8),
      "spacing": 2.0,
      "val_fraction": 0.4,
      "split_seed": 0,
      "nonfinite": "reject",
      "skip_bad_files": False,
    }
  )
  c.update(changes)
  return c


def test_added_scans_are_reported_and_keep_the_recorded_split(volume_dir, tmp_path):
  workdir = str(tmp_path / "w")
  seen = []
  train, val = loader.load_splits(data_config(volume_dir), workdir, on_change=seen.append)
  expected_train, expected_val = train_val_split(5, 0.4, 0)
  assert train.names == tuple(f"scan_{i}.nii.gz" for i in expected_train)
  assert val.names == tuple(f"scan_{i}.nii.gz" for i in expected_val)
  assert seen == []
  for i in range(5, 9):
    write_volume(str(volume_dir / f"scan_{i}.nii.gz"), blob_volume(seed=i))
  os.remove(volume_dir / "scan_0.nii.gz")
  train2, val2 = loader.load_splits(data_config(volume_dir), workdir, on_change=seen.append)
  assert (
    len(seen) == 1
    and "4 added (scan_5.nii.gz, scan_6.nii.gz, scan_7.nii.gz and 1 more)" in seen[0]
    and "1 removed (scan_0.nii.gz)" in seen[0]
  )
  # Scans keep their side: nothing validated before is trained on now.
  assert set(val.names) - {"scan_0.nii.gz"} <= set(val2.names)
  assert not set(val.names) & set(train2.names) and not set(val2.names) & set(train2.names)
  assert len(train2.names) + len(val2.names) == 8
  assert split_record.read(workdir)["val"] == list(val2.names)


def test_interrupted_cohort_write_blocks_nothing(tmp_path, monkeypatch):
  from latentfm.data import cohort  # pylint: disable=import-outside-toplevel

  written = []

  def write_then_die(path, volume):
    if len(written) == 1:
      raise KeyboardInterrupt
    written.append(path)
    write_volume(path, volume)

  monkeypatch.setattr(cohort, "write_volume", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    cohort.write_cohort(str(tmp_path / "cohort"), 2, (16, 16, 16))
  assert os.listdir(tmp_path) == []  # neither the cohort nor its partial folder
  monkeypatch.undo()
  directory = cohort.write_cohort(str(tmp_path / "cohort"), 2, (16, 16, 16))
  assert sorted(os.listdir(directory)) == [
    "cohort.json",
    "manifest.csv",
    "subject_0000.nii.gz",
    "subject_0001.nii.gz",
  ]

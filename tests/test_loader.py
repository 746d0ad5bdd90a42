import hashlib
import os

import grain
import numpy as np
import pytest

from latentfm.data import loader
from latentfm.data.cohort import write_cohort
from latentfm.data.io import VolumeError


def _tree_digest(directory):
  h = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    h.update(name.encode())
    h.update((directory / name).read_bytes())
  return h.hexdigest()


def _dataset(n=10, size=8):
  rng = np.random.default_rng(0)
  return loader.Dataset(
    rng.random((n, size, size, size), dtype=np.float32),
    np.arange(n, dtype=np.int32),
    tuple(f"v{i}" for i in range(n)),
  )


def test_index_directory_without_manifest(volume_dir):
  (volume_dir / "notes.txt").write_text("ignored")
  items = loader.index_directory(str(volume_dir))
  assert [os.path.basename(p) for p, _ in items] == [f"scan_{i}.nii.gz" for i in range(5)]
  assert {l for _, l in items} == {loader.UNLABELLED}


def test_index_directory_with_manifest(tmp_path):
  d = write_cohort(str(tmp_path / "c"), 4, (16, 16, 16))
  assert [l for _, l in loader.index_directory(d)] == [0, 1, 2, 3]
  with open(os.path.join(d, "manifest.csv"), "a") as f:
    f.write("missing.nii.gz,1,0\n")
  with pytest.raises(VolumeError, match="missing.nii.gz"):
    loader.index_directory(d)


def test_empty_and_missing_directories(tmp_path):
  with pytest.raises(VolumeError, match="no volume files"):
    loader.index_directory(str(tmp_path))
  with pytest.raises(VolumeError, match="does not exist"):
    loader.index_directory(str(tmp_path / "nope"))


def test_load_dataset_caches_and_never_touches_input(volume_dir, tmp_path, monkeypatch):
  before = _tree_digest(volume_dir)
  cache = tmp_path / "cache"
  ds = loader.load_dataset(str(volume_dir), (16, 16, 16), 1.0, cache_dir=str(cache))
  assert ds.volumes.shape == (5, 16, 16, 16) and ds.volumes.dtype == np.float32
  assert 0.0 <= ds.volumes.min() and ds.volumes.max() <= 1.0
  assert len(os.listdir(cache)) == 1
  monkeypatch.setattr(loader, "read_volume", lambda p: (_ for _ in ()).throw(AssertionError))
  again = loader.load_dataset(str(volume_dir), (16, 16, 16), 1.0, cache_dir=str(cache))
  np.testing.assert_array_equal(again.volumes, ds.volumes)  # served from the cache
  assert _tree_digest(volume_dir) == before


def test_unreadable_file_mixed_in_is_named(volume_dir, tmp_path):
  (volume_dir / "scan_2.nii.gz").write_bytes(b"\x1f\x8b broken")
  with pytest.raises(VolumeError, match="scan_2.nii.gz"):
    loader.load_dataset(str(volume_dir), (8, 8, 8), cache_dir=str(tmp_path / "cache"))
  assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_train_batches_shapes_and_augmentation():
  ds = _dataset()
  it = iter(loader.make_loader(ds, 4, train=True, seed=0, augmentation=loader.Augment()))
  batch = next(it)
  assert batch["image"].shape == (4, 8, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  for img, label in zip(batch["image"], batch["label"]):
    raw = ds.volumes[label]
    ratio = img[..., 0].sum() / raw.sum()
    assert 0.7 <= ratio <= 1.0  # intensity scaling only changes the scale


def test_seeded_and_resumable():
  ds = _dataset()
  make = lambda seed: iter(
    loader.make_loader(ds, 3, train=True, seed=seed, augmentation=loader.Augment())
  )
  a, b = make(1), make(1)
  for _ in range(5):
    np.testing.assert_array_equal(next(a)["image"], next(b)["image"])
  state = a.get_state()
  expected = [next(a) for _ in range(4)]  # crosses an epoch boundary (10 volumes, batch 3)
  resumed = make(1)
  resumed.set_state(state)
  for e in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["label"], e["label"])
    np.testing.assert_array_equal(got["image"], e["image"])
  other = next(make(2))["label"]
  assert not np.array_equal(other, next(make(1))["label"])


def test_eval_reads_each_volume_once_in_order():
  batches = list(loader.make_loader(_dataset(), 4, train=False))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.arange(10))


def test_process_shards_are_disjoint():
  ds = _dataset(12)
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    it = iter(loader.make_loader(ds, 3, train=True, seed=0, shard=shard, num_epochs=1))
    seen.append(np.concatenate([b["label"] for b in it]))
  assert set(seen[0]).isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 6


def test_batch_larger_than_data_rejected():
  with pytest.raises(ValueError, match="cannot fill a batch"):
    loader.make_loader(_dataset(3), 4, train=True)


def test_class_balanced_draws_every_class_equally():
  labels = np.array([3, 3, 3, 3, 3, 2, 2, 1], np.int32)
  ds = loader.Dataset(np.arange(8, dtype=np.float32)[:, None], labels, tuple("abcdefgh"))
  out = loader.class_balanced(ds)
  assert sorted(np.unique(out.labels, return_counts=True)[1]) == [5, 5, 5]
  assert set(out.names) == set(ds.names)  # every scan kept, the rare ones repeated
  assert out.names.count("h") == 5 and out.names.count("f") == 3
  np.testing.assert_array_equal(out.volumes[:, 0], [ds.names.index(n) for n in out.names])

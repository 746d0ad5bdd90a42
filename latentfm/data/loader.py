"""A grain input pipeline from a directory of volumes (a user's scans or the embedded cohort).

Files are read and preprocessed once into a cached array (so epochs never redo SimpleITK work),
then served by a grain `DataLoader`: shuffled by seed, sharded by JAX process, augmented (train
only), batched to `(B, D, H, W, 1)` float32 with integer labels. The iterator's state
(`get_state()`/`set_state()`) is a small JSON-able dict that checkpoints the data position.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np

from latentfm.data.cohort import write_cohort
from latentfm.data.io import VolumeError, is_volume_file, read_volume
from latentfm.data.preprocess import augment, preprocess_volume, train_val_split

CACHE_VERSION = 1
UNLABELLED = -1


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Preprocessed volumes float32 [N, D, H, W] in [0, 1], labels int32 [N], and file names."""

  volumes: np.ndarray
  labels: np.ndarray
  names: tuple[str, ...]

  def subset(self, indices: Sequence[int]) -> "Dataset":
    indices = np.asarray(indices, int)
    return Dataset(self.volumes[indices], self.labels[indices],
                   tuple(self.names[i] for i in indices))


def index_directory(directory: str) -> list[tuple[str, int]]:
  """(path, label) of every volume in `directory`; labels come from `manifest.csv` if present."""
  if not os.path.isdir(directory):
    raise VolumeError(f"{directory}: data directory does not exist")
  manifest = os.path.join(directory, "manifest.csv")
  if os.path.isfile(manifest):
    with open(manifest, newline="") as f:
      rows = list(csv.DictReader(f))
    if not rows or "file" not in rows[0]:
      raise VolumeError(f"{manifest}: expected a header with a 'file' column and at least one row")
    items = []
    for row in rows:
      path = os.path.join(directory, row["file"])
      if not os.path.isfile(path):
        raise VolumeError(f"{manifest}: lists {row['file']!r}, which does not exist")
      try:
        label = int(row.get("stage") or row.get("label") or UNLABELLED)
      except ValueError:
        raise VolumeError(f"{manifest}: label of {row['file']!r} is not an integer") from None
      items.append((path, label))
    return items
  names = sorted(n for n in os.listdir(directory) if is_volume_file(n) and not n.startswith("."))
  if not names:
    raise VolumeError(f"{directory}: no volume files (.nii, .nii.gz, .mha, .mhd, .nrrd) found")
  return [(os.path.join(directory, n), UNLABELLED) for n in names]


def _cache_key(items: Sequence[tuple[str, int]], shape: Sequence[int],
               spacing: float | None) -> str:
  h = hashlib.sha256()
  spec = {"v": CACHE_VERSION, "shape": list(map(int, shape)), "spacing": spacing}
  h.update(json.dumps(spec, sort_keys=True).encode())
  for path, label in items:
    st = os.stat(path)
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
  return h.hexdigest()[:16]


def load_dataset(directory: str, shape: Sequence[int] = (64, 64, 64), spacing: float | None = 1.0,
                 cache_dir: str | None = None,
                 progress: Callable[[Iterable], Iterable] | None = None) -> Dataset:
  """Reads and preprocesses every volume of `directory` once; cached in `cache_dir` if given.

  The input directory is only read. `progress` may wrap the per-file loop (e.g. `tqdm.tqdm`).
  """
  items = index_directory(directory)
  key = _cache_key(items, shape, spacing)
  cache = os.path.join(cache_dir, f"volumes-{key}.npz") if cache_dir else None
  names = tuple(os.path.basename(p) for p, _ in items)
  labels = np.asarray([l for _, l in items], np.int32)
  if cache and os.path.isfile(cache):
    with np.load(cache) as f:
      return Dataset(f["volumes"], labels, names)
  loop = progress(items) if progress else items
  volumes = np.stack([preprocess_volume(read_volume(p), shape, spacing, name=p) for p, _ in loop])
  if cache:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, volumes=volumes)
    os.replace(tmp, cache)
  return Dataset(volumes, labels, names)


class ArraySource:
  """grain random-access source over a `Dataset`: records {"image": (D,H,W,C), "label": ()}."""

  def __init__(self, dataset: Dataset):
    self._dataset = dataset

  def __len__(self) -> int:
    return len(self._dataset.volumes)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    item = self._dataset.volumes[index]
    if item.ndim == 3:  # a scalar volume gets its channel axis; latents (d,h,w,C) have one
      item = item[..., None]
    return {"image": item, "label": np.int32(self._dataset.labels[index])}

  def __repr__(self) -> str:
    return f"ArraySource(n={len(self)}, shape={self._dataset.volumes.shape[1:]})"


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """Training augmentation: random flips and intensity scaling (see `preprocess.augment`)."""

  flip_axes: tuple[int, ...] = (2,)
  intensity_range: tuple[float, float] = (0.7, 1.0)

  def random_map(self, element, rng: np.random.Generator):
    image = augment(element["image"][..., 0], rng, self.flip_axes, self.intensity_range)
    return {"image": image[..., None], "label": element["label"]}


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0,
                augmentation: Augment | None = None, num_epochs: int | None = None,
                worker_count: int = 0,
                shard: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  """A grain `DataLoader` yielding {"image": (B,D,H,W,1) float32, "label": (B,) int32}.

  `batch_size` is per JAX process. Training loaders shuffle, repeat forever (unless
  `num_epochs`), augment and drop the last partial batch; evaluation loaders read each of this
  process's volumes once, in order. `shard` overrides the per-process sharding.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if shard is None:  # disjoint data per JAX process (multi-host)
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=train)
  n_local = len(dataset.volumes) // shard.shard_count
  if train and n_local < batch_size:
    raise ValueError(f"{len(dataset.volumes)} training volumes over {shard.shard_count} "
                     f"process(es) cannot fill a batch of {batch_size}")
  sampler = grain.samplers.IndexSampler(
      num_records=len(dataset.volumes), shard_options=shard, shuffle=train,
      num_epochs=num_epochs if num_epochs is not None else (None if train else 1), seed=seed)
  ops = []
  if train and augmentation is not None:
    ops.append(augmentation)
  ops.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=train))
  # The arrays are in memory: read in the calling thread (no reader threads to spin or leak).
  return grain.DataLoader(data_source=ArraySource(dataset), sampler=sampler, operations=ops,
                          worker_count=worker_count,
                          read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def load_splits(data: Any, workdir: str, seed: int = 0,
                progress: Callable[[Iterable], Iterable] | None = None
                ) -> tuple[Dataset, Dataset]:
  """(train, validation) datasets for a config's `data` section.

  `data.dir = None` generates the embedded cohort into `workdir/cohort` (already on the model
  grid, so it is not resampled); a user directory is preprocessed at `data.spacing` mm. The
  preprocessed arrays are cached in `workdir/cache`; the split is deterministic by
  `data.split_seed`.
  """
  shape = tuple(int(s) for s in data.shape)
  if data.dir:
    directory, spacing = str(data.dir), data.spacing
  else:
    proportions = data.get("stage_proportions", None)
    directory = write_cohort(os.path.join(workdir, "cohort"), int(data.cohort_size), shape, seed,
                             None if proportions is None else tuple(proportions))
    spacing = None
  dataset = load_dataset(directory, shape, spacing, os.path.join(workdir, "cache"), progress)
  train, val = train_val_split(len(dataset.volumes), data.val_fraction, data.split_seed)
  return dataset.subset(train), dataset.subset(val)

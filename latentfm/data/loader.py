"""A grain input pipeline from a directory of volumes (a user's scans or the embedded cohort).

Files are read and preprocessed once into a cached array (so epochs never redo SimpleITK work),
then served by a grain `DataLoader`: shuffled by seed, sharded by JAX process, augmented (train
only), batched to `(B, D, H, W, 1)` float32 with integer labels. The iterator's state
(`get_state()`/`set_state()`) is a small JSON-able dict that checkpoints the data position.
Which files a directory holds, and their labels, is `latentfm.data.listing`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np

from latentfm import atomic_write
from latentfm.data import geometry, split_record
from latentfm.data.cohort import write_cohort
from latentfm.data.io import ManyErrors, VolumeError, read_volume
from latentfm.data.listing import UNLABELLED, _index, index_directory  # noqa: F401 (public API)
from latentfm.data.preprocess import augment, preprocess_with_spacing

CACHE_VERSION = 2  # 2: the cache holds each volume's voxel size and direction
SKIPPED = "skipped_files.txt"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Preprocessed volumes float32 [N, D, H, W] in [0, 1], labels int32 [N], and file names.

  `spacings` float [N, 3] and `directions` float [N, 9] are each preprocessed volume's voxel
  size (mm) and direction cosines in SimpleITK's (x, y, z) order (None for latents).
  """

  volumes: np.ndarray
  labels: np.ndarray
  names: tuple[str, ...]
  skipped: tuple[str, ...] = ()  # "path: reason" of each unusable file left out
  spacings: np.ndarray | None = None
  directions: np.ndarray | None = None

  def subset(self, indices: Sequence[int]) -> "Dataset":
    indices = np.asarray(indices, int)
    pick = lambda a: None if a is None else a[indices]
    return Dataset(
      self.volumes[indices],
      self.labels[indices],
      tuple(self.names[i] for i in indices),
      self.skipped,
      pick(self.spacings),
      pick(self.directions),
    )

  def geometry(self) -> geometry.Geometry:
    """The set's median voxel size and commonest direction (`geometry.summarise`)."""
    if self.spacings is None:
      raise ValueError("this dataset holds no voxel geometry")
    return geometry.summarise(self.spacings, self.directions)


def class_balanced(dataset: Dataset) -> Dataset:
  """The dataset with each class's scans repeated up to the largest class's count.

  Training on it draws every class equally often, so a rare class's label embedding is trained
  as often as the common ones' (its few scans are seen more often: check for memorisation).

  Args:
    dataset: with labels int [N].

  Returns:
    A `Dataset` of classes x (largest class count) items, each class's scans cycled in order.
  """
  classes, counts = np.unique(dataset.labels, return_counts=True)
  indices = [np.resize(np.flatnonzero(dataset.labels == c), counts.max()) for c in classes.tolist()]
  return dataset.subset(np.concatenate(indices))


def _file_stamp(path: str) -> str:
  """Size and modification time: a changed stamp invalidates the cache (OSError if unusable)."""
  st = os.stat(path)
  return f"{st.st_size}|{st.st_mtime_ns}"


def _cache_key(
  items: Sequence[tuple[str, int]],
  stamps: Sequence[str],
  shape: Sequence[int],
  spacing: float | None,
  options: dict,
) -> str:
  h = hashlib.sha256()
  spec = {"v": CACHE_VERSION, "shape": list(map(int, shape)), "spacing": spacing, **options}
  h.update(json.dumps(spec, sort_keys=True).encode())
  for (path, label), stamp in zip(items, stamps):
    h.update(f"{os.path.abspath(path)}|{stamp}|{label}\n".encode())
  return h.hexdigest()[:16]


def _stamps(items, problems: list[str]) -> list[str | None]:
  stamps = []
  for path, _ in items:
    try:
      stamps.append(_file_stamp(path))
    except OSError as e:  # e.g. a symbolic link loop or a dangling link
      stamps.append(None)
      if not any(p.startswith(f"{path}:") for p in problems):
        problems.append(f"{path}: {e.strerror or e}")
  return stamps


def load_dataset(
  directory: str,
  shape: Sequence[int] = (64, 64, 64),
  spacing: float | None = 1.0,
  cache_dir: str | None = None,
  progress: Callable[[Iterable], Iterable] | None = None,
  *,
  nonfinite: str = "reject",
  skip_bad_files: bool = False,
) -> Dataset:
  """Reads and preprocesses every volume of `directory` once; cached in `cache_dir` if given.

  The input directory is only read. `progress` may wrap the per-file loop (e.g. `tqdm.tqdm`).
  Every file is tried before any error: the unusable ones are reported together (`ManyErrors`,
  one line each) or, with `skip_bad_files`, left out and listed in `Dataset.skipped`.
  `nonfinite` is `io.read_volume`'s policy for NaN/Inf voxels.

  Returns:
    The `Dataset`: volumes float32 [N, *shape] in [0, 1], labels int32 [N], names.
  """
  items, problems = _index(directory)
  stamps = _stamps(items, problems)
  usable = [i for i, stamp in enumerate(stamps) if stamp is not None]
  options = (
    {"nonfinite": nonfinite, "skip": True}
    if skip_bad_files
    else ({"nonfinite": nonfinite} if nonfinite != "reject" else {})
  )
  key = _cache_key([items[i] for i in usable], [stamps[i] for i in usable], shape, spacing, options)
  cache = os.path.join(cache_dir, f"volumes-{key}.npz") if cache_dir else None
  if cache and os.path.isfile(cache) and not (problems and not skip_bad_files):
    with np.load(cache) as f:
      kept = [usable[i] for i in f["kept"]] if "kept" in f else usable
      cached = [p for p in _cached_problems(f) if p not in problems]
      return _dataset(items, kept, f["volumes"], problems + cached, f["spacings"], f["directions"])
  volumes, spacings, directions, kept = [], [], [], []
  loop = progress(usable) if progress else usable
  for i in loop:
    path = items[i][0]
    try:
      volume = read_volume(path, nonfinite)
      array, voxel_mm = preprocess_with_spacing(volume, shape, spacing, name=path)
      volumes.append(array)
      spacings.append(voxel_mm)
      directions.append(volume.direction)
      kept.append(i)
    except VolumeError as e:
      problems.append(str(e) if str(e).startswith(path) else f"{path}: {e}")
  if problems and not skip_bad_files:
    raise ManyErrors(
      f"{len(problems)} of {len(items)} files in {directory} are unusable (set "
      "data.skip_bad_files=true to train without them):",
      problems,
    )
  if not kept:
    raise VolumeError(f"{directory}: none of its {len(items)} files is usable")
  stacked = np.stack(volumes)
  spacings, directions = np.asarray(spacings, float), np.asarray(directions, float)
  if cache:
    with atomic_write.atomic_path(cache) as tmp:
      np.savez(
        tmp,
        volumes=stacked,
        kept=np.asarray([usable.index(i) for i in kept]),
        problems=np.asarray(problems, dtype=str),
        spacings=spacings,
        directions=directions,
      )
  return _dataset(items, kept, stacked, problems, spacings, directions)


def _cached_problems(f) -> list[str]:
  return [str(p) for p in f["problems"]] if "problems" in f else []


def _dataset(
  items,
  kept: Sequence[int],
  volumes: np.ndarray,
  problems: list[str],
  spacings: np.ndarray,
  directions: np.ndarray,
) -> Dataset:
  return Dataset(
    volumes,
    np.asarray([items[i][1] for i in kept], np.int32),
    tuple(os.path.basename(items[i][0]) for i in kept),
    tuple(problems),
    np.asarray(spacings, float),
    np.asarray(directions, float),
  )


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


def make_loader(
  dataset: Dataset,
  batch_size: int,
  *,
  train: bool,
  seed: int = 0,
  augmentation: Augment | None = None,
  num_epochs: int | None = None,
  worker_count: int = 0,
  shard: grain.sharding.ShardOptions | None = None,
) -> grain.DataLoader:
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
    raise ValueError(
      f"{len(dataset.volumes)} training volumes over {shard.shard_count} "
      f"process(es) cannot fill a batch of {batch_size}"
    )
  sampler = grain.samplers.IndexSampler(
    num_records=len(dataset.volumes),
    shard_options=shard,
    shuffle=train,
    num_epochs=num_epochs if num_epochs is not None else (None if train else 1),
    seed=seed,
  )
  ops = []
  if train and augmentation is not None:
    ops.append(augmentation)
  ops.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=train))
  # The arrays are in memory: read in the calling thread (no reader threads to spin or leak).
  return grain.DataLoader(
    data_source=ArraySource(dataset),
    sampler=sampler,
    operations=ops,
    worker_count=worker_count,
    read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
  )


def load_splits(
  data: Any,
  workdir: str,
  seed: int = 0,
  progress: Callable[[Iterable], Iterable] | None = None,
  *,
  on_change: Callable[[str], None] | None = None,
) -> tuple[Dataset, Dataset]:
  """(train, validation) datasets for a config's `data` section.

  `data.dir = None` generates the embedded cohort into `workdir/cohort` (already on the model
  grid, so it is not resampled); a user directory is preprocessed at `data.spacing` mm. The
  preprocessed arrays are cached in `workdir/cache`; the split is deterministic by
  `data.split_seed` and, once recorded in the workdir (`split_record`), stable when files are
  added or removed.

  Args:
    data: the config's data section.
    workdir: the stage's workdir (cohort, cache and split record).
    seed: the cohort's seed.
    progress: wraps the per-file loop.
    on_change: given, the caller is the stage's training run: it is called with one line when
      the data changed against the record (it may raise to refuse), and the split and the
      skipped files are recorded in the workdir, and so is the training volumes' geometry
      (`geometry.json`: median voxel size and orientation, which samples are written with).
      None only reads.
  """
  shape = tuple(int(s) for s in data.shape)
  if data.dir:
    directory, spacing = str(data.dir), data.spacing
  else:
    proportions = data.get("stage_proportions", None)
    directory = write_cohort(
      os.path.join(workdir, "cohort"),
      int(data.cohort_size),
      shape,
      seed,
      None if proportions is None else tuple(proportions),
    )
    spacing = None
  dataset = load_dataset(
    directory,
    shape,
    spacing,
    os.path.join(workdir, "cache"),
    progress,
    nonfinite=data.get("nonfinite", "reject"),
    skip_bad_files=data.get("skip_bad_files", False),
  )
  train, val, added, removed = split_record.assign(
    dataset.names, data.val_fraction, data.split_seed, split_record.read(workdir)
  )
  if on_change is not None:
    if added or removed:
      on_change(split_record.describe(directory, added, removed))
    split_record.write(workdir, dataset.names, train, val)
    _record_skipped(workdir, dataset.skipped)
    geometry.write(workdir, dataset.subset(train).geometry())
  return dataset.subset(train), dataset.subset(val)


def _record_skipped(workdir: str, skipped: Sequence[str]) -> None:
  path = os.path.join(workdir, SKIPPED)
  if skipped:
    _log.warning("left out %d unusable file(s), listed in %s", len(skipped), path)
    atomic_write.write_text(path, "".join(f"{line}\n" for line in skipped))
  elif os.path.isfile(path):
    os.remove(path)

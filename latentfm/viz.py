"""Tri-planar previews: axial, coronal and sagittal mid-slices of volumes, as arrays or PNGs."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from latentfm import atomic_write

PLANES = ("axial", "coronal", "sagittal")


def _as_batch(volumes) -> np.ndarray:
  arr = np.asarray(volumes, np.float32)
  if arr.ndim == 5 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 3:
    arr = arr[None]
  if arr.ndim != 4:
    raise ValueError(f"expected (D,H,W), (N,D,H,W) or (N,D,H,W,1) volumes, got {arr.shape}")
  return arr


def mid_slices(
  volume: np.ndarray, at: Sequence[float] = (0.5, 0.5, 0.5)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Axial, coronal and sagittal slices of a (D, H, W) volume at fractional position `at`.

  Arrays are indexed (z, y, x); slices are flipped so that z points up on screen. The default
  is the middle of each axis.
  """
  d, h, w = (min(int(f * n), n - 1) for f, n in zip(at, volume.shape))
  return volume[d], volume[::-1, h, :], volume[::-1, :, w]


def triplanar_image(volumes, pad: int = 2, at: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
  """A mosaic (rows = volumes, columns = planes) as a 2D float array for TensorBoard or PNG."""
  batch = _as_batch(volumes)
  rows = []
  for vol in batch:
    tiles = mid_slices(vol, at)
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0] + pad), (0, pad))) for t in tiles]
    rows.append(np.concatenate(tiles, axis=1))
  return np.concatenate(rows, axis=0)


def save_triplanar(
  path: str,
  volumes,
  row_labels: Sequence[str] | None = None,
  title: str | None = None,
  vmin: float = 0.0,
  vmax: float = 1.0,
  at: Sequence[float] = (0.5, 0.5, 0.5),
) -> str:
  """Writes a PNG with one row per volume and the three slices (see `mid_slices`) as columns."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  batch = _as_batch(volumes)
  n = len(batch)
  if row_labels is not None and len(row_labels) != n:
    raise ValueError(f"{len(row_labels)} row labels for {n} volumes")
  fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n + (0.4 if title else 0.0)), squeeze=False)
  for i, vol in enumerate(batch):
    for j, (plane, img) in enumerate(zip(PLANES, mid_slices(vol, at))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(plane, fontsize=9)
      if j == 0 and row_labels is not None:
        ax.set_ylabel(row_labels[i], fontsize=8)
  return _finish(fig, path, title)


def save_grid(
  path: str,
  volumes,
  row_labels: Sequence[str],
  col_labels: Sequence[str],
  title: str | None = None,
  planes: Sequence[str] = ("axial", "coronal"),
  at: Sequence[float] = (0.5, 0.5, 0.5),
) -> str:
  """Writes a PNG comparing volumes side by side: one column per volume of a row.

  Args:
    path: the PNG to write.
    volumes: `[R, C, D, H, W]` in [0, 1], e.g. rows of methods and columns of conditions.
    row_labels: R names; col_labels: C names.
    title: above the grid.
    planes: which of `PLANES` to show; each row of volumes gives one figure row per plane.
    at: the fractional position of the slices (see `mid_slices`).

  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  grid = np.asarray(volumes, np.float32)
  if grid.ndim != 5 or grid.shape[:2] != (len(row_labels), len(col_labels)):
    raise ValueError(
      f"expected [{len(row_labels)}, {len(col_labels)}, D, H, W] volumes, got {grid.shape}"
    )
  unknown = sorted(set(planes) - set(PLANES))
  if unknown:
    raise ValueError(f"planes must be among {PLANES}, got {unknown}")
  rows, cols = grid.shape[0] * len(planes), grid.shape[1]
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.4, 1.6 * rows + 0.6), squeeze=False)
  for r, (label, volumes_row) in enumerate(zip(row_labels, grid)):
    for p, plane in enumerate(planes):
      for c, vol in enumerate(volumes_row):
        ax = axes[r * len(planes) + p, c]
        ax.imshow(mid_slices(vol, at)[PLANES.index(plane)], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0 and p == 0:
          ax.set_title(col_labels[c], fontsize=9)
        if c == 0:
          ax.set_ylabel(f"{label}\n{plane}", fontsize=8)
  return _finish(fig, path, title)


def _finish(fig, path: str, title: str | None) -> str:
  """Titles, lays out and writes `fig` to `path` (atomically, PNG), then closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  with atomic_write.atomic_path(path) as partial:  # same suffix: the format stays PNG
    fig.savefig(partial, dpi=100)
  plt.close(fig)
  return path

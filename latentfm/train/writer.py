"""Metric sinks shared by both stages: `metrics.jsonl` and TensorBoard (scalars and images)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np


class MetricWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard.

  Only JAX process 0 writes. On resume, lines with a step beyond `resume_step` (written after
  the last checkpoint by a run that died) are dropped so the log continues without duplicates.
  """

  def __init__(
    self, workdir: str, *, tensorboard: bool = True, resume_step: int = 0, enabled: bool = True
  ):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """A 2D grey image in [0, 1] (e.g. `viz.triplanar_image`) to TensorBoard."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, np.clip(np.asarray(image, np.float32), 0, 1)[None], step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _to_float(v) -> float:
  return float(np.asarray(v))


def _truncate_after(path: str, step: int) -> None:
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = [l for l in f if l.strip()]
  keep = [l for l in lines if json.loads(l).get("step", 0) <= step]
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl`."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]

"""The one training loop both stages share.

It feeds host batches through the sharding helper into a jitted step, logs metrics, runs
periodic callbacks (images, validation), checkpoints the train state together with the
data-iterator position, stops on non-finite losses, and turns SIGTERM/SIGINT into a final
checkpoint and a clean exit.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh

from latentfm.train import checkpoint, parallel
from latentfm.train.writer import MetricWriter

PROGRESS_KEYS = ("loss", "l1", "perceptual", "d_loss", "perplexity")
StepFn = Callable[[Any, Any, int], tuple[Any, Mapping[str, jax.Array]]]


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN/Inf; the message names the step and the term."""


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Calls `fn(step, state)` every `every` finished steps (and at the last step)."""

  every: int
  fn: Callable[[int, Any], Mapping[str, float] | None]


class StopRequest:
  """Set by SIGTERM/SIGINT while installed: the loop finishes the step, saves and returns."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
  """Raises `NonFiniteLossError` naming the first non-finite metric."""
  for name, value in metrics.items():
    if not math.isfinite(float(value)):
      raise NonFiniteLossError(f"step {step}: {name} is {float(value)}; "
                               "stopping with the last good checkpoint kept")


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  stopped_by_signal: int | None = None


def resume(manager, state: Any, data_iter) -> tuple[Any, int]:
  """Restores `state` and the data position from the latest checkpoint, if there is one.

  Returns `(state, first_step)`; a fresh run gets `(state, 0)` back unchanged.
  """
  first_step = checkpoint.latest_step(manager) or 0
  if first_step:
    state, data_state, _ = checkpoint.restore(manager, state)
    if data_state is not None:
      data_iter.set_state(data_state)
  return state, first_step


def train_loop(state: Any, train_step: StepFn, data_iter: Iterator, *, mesh: Mesh,
               first_step: int, num_steps: int, manager, writer: MetricWriter,
               log_every: int, ckpt_every: int, callbacks: Sequence[Periodic] = (),
               extra: Mapping[str, Any] | None = None,
               progress: Any = None) -> LoopResult:
  """Runs `train_step(state, batch, step)` from `first_step` to `num_steps`.

  `data_iter` yields host-local batches and has `get_state()`; `progress` (optional) is a
  tqdm-like object with `update(n)` and `set_postfix(dict)`.
  """
  step = first_step
  with StopRequest() as stop:
    while step < num_steps:
      batch = parallel.shard_batch(next(data_iter), mesh)
      state, metrics = train_step(state, batch, step)
      step += 1
      is_ckpt = step % ckpt_every == 0 or step == num_steps or stop.signal is not None
      row = {}
      if step % log_every == 0 or is_ckpt:
        row = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        check_finite(step, row)
        if progress is not None:
          shown = [k for k in PROGRESS_KEYS if k in row] or list(row)[:4]
          progress.set_postfix({k: f"{row[k]:.4g}" for k in shown}, refresh=False)
      for cb in callbacks:
        if step % cb.every == 0 or step == num_steps:
          row.update(cb.fn(step, state) or {})
      if row:
        writer.write_scalars(step, row)
      if is_ckpt:
        checkpoint.save(manager, step, state, data_state=data_iter.get_state(), extra=extra,
                        force=True)
      if progress is not None:
        progress.update(1)
      if stop.signal is not None:
        break
  checkpoint.wait(manager)
  return LoopResult(state, step, stop.signal)

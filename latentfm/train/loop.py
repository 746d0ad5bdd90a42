"""The one training loop both stages share.

It feeds host batches through the sharding helper into a jitted step, logs metrics, runs
periodic callbacks (images, validation), checkpoints the train state together with the
data-iterator position, stops on non-finite losses (or, with steps wrapped by
`skip_nonfinite`, skips them and counts the skips), and turns SIGTERM/SIGINT into a final
checkpoint and a clean exit.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from latentfm.train import checkpoint, parallel
from latentfm.train.writer import MetricWriter

PROGRESS_KEYS = ("loss", "l1", "perceptual", "d_loss", "perplexity")
StepFn = Callable[[Any, Any, int], tuple[Any, Mapping[str, jax.Array]]]


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN/Inf; the message names the step and the term."""


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Calls `fn(step, state)` every `every` finished steps and at the last step; never when
  `every` <= 0."""

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
      raise NonFiniteLossError(
        f"step {step}: {name} is {float(value)}; stopping with the last good checkpoint kept"
      )


def skip_nonfinite(
  step_fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]],
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """Wraps a pure `step(state, *args) -> (state, metrics)` to skip non-finite updates.

  When any metric (losses and gradient norms, so a NaN/Inf in either) is not finite, the
  returned state is the input state (parameters, optimizer and EMA, codebook, discriminators)
  with only its `"step"` counter advanced. Adds the metric `"skipped"` (1.0 or 0.0).
  The whole state is selected, not just the optimizer update (as `optax.apply_if_finite`
  would do), because codebook and EMA updates happen outside the optimizer.
  """

  def guarded(state, *args):
    new, metrics = step_fn(state, *args)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in jax.tree.leaves(metrics)]))
    out = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    if isinstance(new, dict) and "step" in new:
      out["step"] = new["step"]
    return out, dict(metrics, skipped=jnp.logical_not(ok).astype(jnp.float32))

  return guarded


NONFINITE_POLICIES = ("stop", "skip")


def check_nonfinite_policy(policy: str) -> None:
  """ValueError naming `train.on_nonfinite` unless `policy` is "stop" or "skip"."""
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.on_nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")


def guard_step(step_fn: Callable, policy: str) -> Callable:
  """`step_fn` itself for policy "stop" (the loop stops on a non-finite metric), wrapped by
  `skip_nonfinite` for "skip"."""
  check_nonfinite_policy(policy)
  return skip_nonfinite(step_fn) if policy == "skip" else step_fn


class SkipCounter:
  """Counts steps skipped by `skip_nonfinite`; too many in a row raise `NonFiniteLossError`.

  It reads one scalar per step, which waits for that step to finish: the "skip" policy gives
  up overlapping host work with the next step, the default "stop" policy does not.
  """

  def __init__(self, max_consecutive: int):
    self.max_consecutive = max_consecutive
    self.total = self.since_last_row = self.consecutive = 0

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    skipped = bool(jax.device_get(metrics["skipped"]))
    self.consecutive = self.consecutive + 1 if skipped else 0
    self.total += skipped
    self.since_last_row += skipped
    if self.consecutive > self.max_consecutive:
      bad = [k for k, v in jax.device_get(dict(metrics)).items() if not math.isfinite(v)]
      raise NonFiniteLossError(
        f"step {step}: {', '.join(bad)} not finite for {self.consecutive} consecutive steps "
        "(all skipped); stopping with the last good checkpoint kept"
      )

  def log_row(self, row: Mapping[str, float]) -> dict[str, float]:
    """The finite metrics of `row` plus `skipped_steps` (skips since the previous row)."""
    out = {k: v for k, v in row.items() if math.isfinite(v) and k != "skipped"}
    out["skipped_steps"], self.since_last_row = float(self.since_last_row), 0
    return out


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  stopped_by_signal: int | None = None
  skipped_steps: int = 0


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


def train_loop(
  state: Any,
  train_step: StepFn,
  data_iter: Iterator,
  *,
  mesh: Mesh,
  first_step: int,
  num_steps: int,
  manager,
  writer: MetricWriter,
  log_every: int,
  ckpt_every: int,
  callbacks: Sequence[Periodic] = (),
  extra: Mapping[str, Any] | None = None,
  progress: Any = None,
  max_consecutive_skips: int = 10,
) -> LoopResult:
  """Runs `train_step(state, batch, step)` from `first_step` to `num_steps`.

  `data_iter` yields host-local batches and has `get_state()`; `progress` (optional) is a
  tqdm-like object with `update(n)` and `set_postfix(dict)`. A step wrapped by
  `skip_nonfinite` reports `"skipped"`: such steps are counted (logged as `skipped_steps`,
  the skips since the previous logged row), and more than `max_consecutive_skips` in a row
  stop the run with `NonFiniteLossError`. Any other non-finite logged metric stops it too.
  """
  step = first_step
  skips = SkipCounter(max_consecutive_skips)
  with StopRequest() as stop:
    try:
      while step < num_steps:
        batch = parallel.shard_batch(next(data_iter), mesh)
        state, metrics = train_step(state, batch, step)
        step += 1
        if "skipped" in metrics:
          skips.add(step, metrics)
        stopping = stop.signal is not None  # read once: a later signal waits for the next step
        is_ckpt = step % ckpt_every == 0 or step == num_steps or stopping
        row = {}
        if step % log_every == 0 or is_ckpt:
          row = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
          if "skipped" in row:
            row = skips.log_row(row)
          check_finite(step, row)
          if progress is not None:
            shown = [k for k in PROGRESS_KEYS if k in row] or list(row)[:4]
            progress.set_postfix({k: f"{row[k]:.4g}" for k in shown}, refresh=False)
        for cb in callbacks:
          if cb.every > 0 and (step % cb.every == 0 or step == num_steps):
            row.update(cb.fn(step, state) or {})
        if row:
          writer.write_scalars(step, row)
        if is_ckpt:
          checkpoint.save(
            manager, step, state, data_state=data_iter.get_state(), extra=extra, force=True
          )
        if progress is not None:
          progress.update(1)
        if stopping:
          break
    finally:
      checkpoint.wait(manager)  # an earlier async save completes even when a step raises
  return LoopResult(state, step, stop.signal, skips.total)

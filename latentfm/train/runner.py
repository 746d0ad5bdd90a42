"""One runner for every training stage: setup, guarded resume, writer, loop and close.

A stage (the VQ-GAN, the latent flow, or any other objective) supplies its config, its initial
state, its training `Dataset` (volumes or latents, with labels) and its jitted step; the runner
does the rest in one order for all of them:

  with open_stage("flow", config, workdir, validate=validate_config) as run:
    ... prepare data (inside the workdir lock) ...
    state = run.start(init_state, dataset)          # verified resume, config record
    result = run.train(step_fn, callbacks, extra)   # the shared loop, with a progress bar

`open_stage` initialises multi-process JAX and host memory, validates the config, takes the
workdir lock and refuses a resume with changed settings (`run_record`); `start` restores the
newest checkpoint that verifies (falling back past corrupt ones) and records the config; the
context's exit waits for the last checkpoint and closes the writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections

from latentfm.data import loader
from latentfm.train import checkpoint, host_memory, parallel, run_record, workdir_lock
from latentfm.train.loop import LoopResult, Periodic, StepFn, train_loop
from latentfm.train.writer import MetricWriter


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class StageRun:
  """A stage's run in its workdir; built by `open_stage`, filled by `start`."""

  name: str
  config: ml_collections.ConfigDict
  workdir: str
  changes: Mapping[str, tuple[Any, Any]]
  main_process: bool
  mesh: Any = None
  manager: Any = None
  writer: MetricWriter | None = None
  data_iter: Any = None
  first_step: int = 0
  result: LoopResult | None = None
  notes: list[str] = dataclasses.field(default_factory=list)
  fresh_epoch: bool = False

  def data_changed(self, line: str) -> None:
    """Refuses a changed training set unless `train.allow_changes`; then the change goes into
    the config history and the data pipeline starts a fresh epoch over the new list.

    Pass as `loader.load_splits(..., on_change=run.data_changed)`, before `start`.
    """
    if not self.config.train.get("allow_changes", False):
      raise run_record.SettingsChangedError(
        f"{line}; rerun with the original files, or add --config.train.allow_changes=true "
        "to continue on the new list (a fresh data epoch; recorded scans keep their split)"
      )
    _warn(f"{line}; continuing on the new list with a fresh data epoch")
    self.notes.append(line)
    self.fresh_epoch = True

  def start(
    self,
    init_state: Any,
    dataset: loader.Dataset,
    *,
    augmentation: loader.Augment | None = None,
    seed: int | None = None,
  ) -> Any:
    """Replicates `init_state`, builds the training loader over `dataset` and resumes.

    Args:
      init_state: a fresh train state (host or device arrays); only used when there is no
        checkpoint, but always built so that restores have a target.
      dataset: the training set; records are served as {"image", "label"} batches of
        `train.batch_size` (global) split over processes.
      augmentation: training augmentation, or None.
      seed: the loader's shuffle seed (default `config.seed`).

    Returns:
      The state to train from; `self.first_step` is its step (0 for a new workdir).
    """
    train = self.config.train
    self.mesh = parallel.make_mesh()
    state = parallel.replicate(init_state, self.mesh)
    self.manager = self._open_manager()
    self.data_iter = iter(
      loader.make_loader(
        dataset,
        parallel.process_batch_size(train.batch_size),
        train=True,
        seed=self.config.seed if seed is None else seed,
        augmentation=augmentation,
        worker_count=self.config.data.get("worker_count", 0) if "data" in self.config else 0,
      )
    )
    if checkpoint.latest_step(self.manager) is not None:
      state, data_state, _, self.first_step = checkpoint.restore_newest_good(
        self.manager, state, report=_warn, set_aside=self.main_process
      )
      if data_state is not None and not self.fresh_epoch:
        self.data_iter.set_state(data_state)
    if self.main_process:
      run_record.record(
        self.workdir, self.config, self.first_step, self.changes, note="; ".join(self.notes) or None
      )
    if any(not run_record.is_free(k) for k in self.changes):  # keep the last step before
      checkpoint.close(self.manager)
      self.manager = self._open_manager()
    self.writer = MetricWriter(
      self.workdir,
      tensorboard=train.tensorboard,
      resume_step=self.first_step,
      enabled=self.main_process,
    )
    return state

  def _open_manager(self):
    return checkpoint.open_manager(
      os.path.join(self.workdir, "ckpt"),
      keep=self.config.train.keep_checkpoints,
      keep_steps=run_record.change_steps(self.workdir),
    )

  def train(
    self,
    state: Any,
    step_fn: StepFn,
    callbacks: Sequence[Periodic] = (),
    extra: Mapping[str, Any] | None = None,
  ) -> LoopResult:
    """Runs the shared loop from `first_step` to `train.num_steps` with a progress bar.

    Args:
      state: from `start`.
      step_fn: `step_fn(state, sharded batch, step) -> (state, metrics)`, jitted.
      callbacks: periodic validation, images or samples.
      extra: JSON metadata saved with every checkpoint (e.g. latent statistics).

    Returns:
      The loop's result (final state and step, stopping signal, skipped steps).
    """
    import tqdm  # pylint: disable=import-outside-toplevel

    train = self.config.train
    with tqdm.tqdm(
      total=train.num_steps,
      initial=self.first_step,
      desc=self.name,
      disable=not self.main_process,
      dynamic_ncols=True,
      unit="step",
    ) as bar:
      self.result = train_loop(
        state,
        step_fn,
        self.data_iter,
        mesh=self.mesh,
        first_step=self.first_step,
        num_steps=train.num_steps,
        manager=self.manager,
        writer=self.writer,
        log_every=train.log_every,
        ckpt_every=train.ckpt_every,
        callbacks=callbacks,
        extra={"stage": self.name, **dict(extra or {})},
        progress=bar,
        max_consecutive_skips=train.max_consecutive_skips,
      )
    return self.result

  def close(self) -> None:
    if self.manager is not None:
      checkpoint.close(self.manager)
    if self.writer is not None:
      self.writer.close()
    result = self.result
    if result is not None and result.stopped_by_signal is not None and self.main_process:
      print(
        f"{self.name}: stopped by signal {result.stopped_by_signal} at step {result.step}; "
        "checkpoint saved, rerun the same command to resume",
        file=sys.stderr,
      )


@contextlib.contextmanager
def open_stage(
  name: str,
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  validate: Callable[[ml_collections.ConfigDict], None],
) -> Iterator[StageRun]:
  """Prepares a stage run in `workdir`: the caller then calls `start` and `train`.

  Args:
    name: the stage's name ("vqgan", "flow", ...), used in logs, checkpoints and the lock.
    config: the stage's config (with a `train` section as in `experiments/configs`).
    workdir: the stage's workdir (created if missing).
    validate: raises ValueError naming the key for impossible settings; runs before anything
      is written.

  Yields:
    The `StageRun`; on exit its checkpoints are complete and its files closed.

  Raises:
    ValueError: invalid config, a workdir held by another run, or changed settings.
  """
  parallel.maybe_initialize_distributed()
  if config.train.get("reuse_host_memory", True):  # configs written before the option
    host_memory.reuse_host_memory()
  validate(config)
  main_process = jax.process_index() == 0
  lock = (
    workdir_lock.hold(workdir, f"{name} training") if main_process else contextlib.nullcontext()
  )
  with lock:
    run = StageRun(name, config, workdir, run_record.check_resume(workdir, config), main_process)
    try:
      yield run
    finally:
      run.close()

"""Settings both stages' configs share: the run, its safety rules and the learning-rate
schedule. Each stage's config adds its own fields and overrides what differs."""

import ml_collections


def train(batch_size: int, log_every: int, ckpt_every: int) -> ml_collections.ConfigDict:
  """The `train` section: how long and how the run goes, and what it does when things fail."""
  t = ml_collections.ConfigDict()
  t.batch_size = batch_size  # global batch: per-device batch x number of devices
  t.num_steps = 100_000
  t.log_every = log_every
  t.ckpt_every = ckpt_every
  t.keep_checkpoints = 3
  # A NaN/Inf loss or gradient: "stop" (exit 1 naming the step and term, last good checkpoint
  # kept) or "skip" (leave the state unchanged, count the skip; stop after this many in a row).
  t.on_nonfinite = "stop"
  t.max_consecutive_skips = 10
  t.tensorboard = True  # also write tensorboard/ (metrics.jsonl is always written)
  # CPU: reuse XLA's per-step host buffers instead of faulting them in every step, which is
  # faster (latentfm.train.host_memory; bench/RESULTS.md, "CPU kernel choices", row "host-memory
  # reuse"). Applied only if JAX has not started yet.
  t.reuse_host_memory = True
  # Resuming with settings other than the workdir's is refused unless this is set; the change
  # is then recorded in config_history.jsonl (latentfm.train.run_record). Run length, logging,
  # evaluation and saving intervals may always change.
  t.allow_changes = False
  return t


def schedule(optim: ml_collections.ConfigDict) -> None:
  """Adds the learning-rate schedule (latentfm.train.schedules) to `optim`: linear warm-up,
  then constant or a half cosine down to final_lr_fraction x lr at train.num_steps."""
  optim.warmup_steps = 0
  optim.schedule = "constant"
  optim.final_lr_fraction = 0.0

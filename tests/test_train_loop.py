"""The shared training loop with a trivial step: logging, checkpoint/resume, signals, NaN stop."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentfm.data import loader
from latentfm.train import checkpoint, parallel
from latentfm.train.loop import (
  NonFiniteLossError,
  Periodic,
  check_finite,
  guard_step,
  skip_nonfinite,
  train_loop,
)
from latentfm.train.writer import MetricWriter, read_metrics


def _data():
  rng = np.random.default_rng(0)
  return loader.Dataset(
    rng.random((6, 4, 4, 4), dtype=np.float32),
    np.arange(6, dtype=np.int32),
    tuple(map(str, range(6))),
  )


@jax.jit
def _step_fn(state, batch):
  w = state["w"] + jnp.mean(batch["image"]) * 0.1
  return {"w": w, "step": state["step"] + 1}, {"loss": w, "label_sum": jnp.sum(batch["label"])}


def step(state, batch, _):
  return _step_fn(state, batch)


def run(workdir, num_steps, hook=None):
  mesh = parallel.make_mesh()
  state = parallel.replicate({"w": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}, mesh)
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"))
  it = iter(loader.make_loader(_data(), 2, train=True, seed=0, augmentation=loader.Augment()))
  first = checkpoint.latest_step(manager) or 0
  if first:
    state, data_state, _ = checkpoint.restore(manager, state)
    it.set_state(data_state)
  writer = MetricWriter(workdir, tensorboard=False, resume_step=first)
  fn = step if hook is None else (lambda s, b, i: hook(i) or step(s, b, i))
  try:
    result = train_loop(
      state,
      fn,
      it,
      mesh=mesh,
      first_step=first,
      num_steps=num_steps,
      manager=manager,
      writer=writer,
      log_every=1,
      ckpt_every=3,
    )
  finally:
    checkpoint.close(manager)
    writer.close()
  return result


def test_resume_continues_exactly(tmp_path):
  full = run(str(tmp_path / "full"), 8)
  part = tmp_path / "part"
  run(str(part), 5)  # checkpoints at 3 and 5 (the last step)
  resumed = run(str(part), 8)
  assert resumed.step == 8 and float(resumed.state["w"]) == float(full.state["w"])
  assert read_metrics(str(part)) == read_metrics(str(tmp_path / "full"))


def test_writer_drops_rows_after_resume_step(tmp_path):
  w = MetricWriter(str(tmp_path), tensorboard=False)
  for s in range(1, 6):
    w.write_scalars(s, {"loss": s})
  w.close()
  w = MetricWriter(str(tmp_path), tensorboard=True, resume_step=3)
  w.write_scalars(4, {"loss": 40.0})
  w.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (4, 40.0),
  ]
  assert os.path.isdir(tmp_path / "tensorboard")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_stops(tmp_path, sig):
  def hook(i):
    if i == 1:
      os.kill(os.getpid(), sig)

  result = run(str(tmp_path), 10, hook)
  assert result.stopped_by_signal == sig and result.step == 2
  manager = checkpoint.open_manager(str(tmp_path / "ckpt"))
  assert checkpoint.latest_step(manager) == 2
  checkpoint.close(manager)
  assert run(str(tmp_path), 4).step == 4  # the rerun resumes


def test_nan_stops_with_named_term_and_keeps_checkpoint(tmp_path):
  def bad_step(state, batch, i):
    new, metrics = step(state, batch, i)
    if i == 4:
      metrics = dict(metrics, loss=jnp.nan)
    return new, metrics

  mesh = parallel.make_mesh()
  manager = checkpoint.open_manager(str(tmp_path / "ckpt"))
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  it = iter(loader.make_loader(_data(), 2, train=True))
  state = {"w": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(NonFiniteLossError, match="step 5: loss is nan"):
    train_loop(
      state,
      bad_step,
      it,
      mesh=mesh,
      first_step=0,
      num_steps=10,
      manager=manager,
      writer=writer,
      log_every=1,
      ckpt_every=3,
    )
  checkpoint.wait(manager)
  assert checkpoint.latest_step(manager) == 3
  checkpoint.close(manager)


def test_check_finite():
  check_finite(1, {"a": 1.0})
  with pytest.raises(NonFiniteLossError, match="step 7: d_loss is inf"):
    check_finite(7, {"a": 1.0, "d_loss": float("inf")})


@jax.jit
@skip_nonfinite
def _nan_after(state, batch, bad_steps):
  """The toy step, with a NaN loss at the (0-based) state steps listed in `bad_steps`."""
  new, metrics = _step_fn(state, batch)
  bad = jnp.any(state["step"] == bad_steps)
  return new, dict(metrics, loss=jnp.where(bad, jnp.nan, metrics["loss"]))


def _run_guarded(workdir, bad_steps, num_steps=8, **kw):
  mesh = parallel.make_mesh()
  manager = checkpoint.open_manager(os.path.join(workdir, "ckpt"))
  writer = MetricWriter(workdir, tensorboard=False)
  it = iter(loader.make_loader(_data(), 2, train=True, seed=0, augmentation=loader.Augment()))
  state = {"w": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}
  bad = jnp.asarray(bad_steps, jnp.int32)
  try:
    return train_loop(
      state,
      lambda s, b, i: _nan_after(s, b, bad),
      it,
      mesh=mesh,
      first_step=0,
      num_steps=num_steps,
      manager=manager,
      writer=writer,
      log_every=1,
      ckpt_every=3,
      **kw,
    )
  finally:
    checkpoint.close(manager)
    writer.close()


def test_skip_nonfinite_keeps_state_and_counts_skips(tmp_path):
  clean = _run_guarded(str(tmp_path / "clean"), [-1])
  w = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "clean"))}
  skipped = _run_guarded(str(tmp_path / "skip"), [4, 6])  # the 5th and 7th updates
  rows = read_metrics(str(tmp_path / "skip"))
  assert skipped.skipped_steps == 2 and clean.skipped_steps == 0
  assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0, 1, 0, 1, 0]
  assert "loss" not in rows[4] and "loss" not in rows[6] and "label_sum" in rows[4]
  assert int(skipped.state["step"]) == 8  # the step counter still advances
  increments = {s: w[s] - w.get(s - 1, 0.0) for s in w}
  expected = w[8] - increments[5] - increments[7]
  assert float(skipped.state["w"]) == pytest.approx(expected, abs=1e-6)


def test_too_many_consecutive_skips_stop(tmp_path):
  with pytest.raises(NonFiniteLossError, match="step 6: loss not finite for 3 consecutive steps"):
    _run_guarded(str(tmp_path), [3, 4, 5, 6, 7], max_consecutive_skips=2)
  manager = checkpoint.open_manager(str(tmp_path / "ckpt"))
  assert checkpoint.latest_step(manager) == 3  # the last step before the bad ones
  checkpoint.close(manager)


def test_guard_step_policies_and_never_periodic(tmp_path):
  assert guard_step(_step_fn, "stop") is _step_fn
  with pytest.raises(ValueError, match="train.on_nonfinite"):
    guard_step(_step_fn, "ignore")
  calls = []
  result = _run_guarded(
    str(tmp_path),
    [-1],
    num_steps=4,
    callbacks=[
      Periodic(0, lambda s, st: calls.append(s)),
      Periodic(3, lambda s, st: calls.append(-s)),
    ],
  )
  assert result.step == 4 and calls == [-3, -4]


def test_skip_nonfinite_on_a_real_flow_step():
  from experiments.configs import flow as flow_configs  # pylint: disable=import-outside-toplevel
  from latentfm.train import flow_step  # pylint: disable=import-outside-toplevel

  c = flow_configs.get_config("demo")
  c.model.channels, c.model.time_embed_dim = 8, 16
  c.model.channel_mults, c.model.attention_levels = (1,), ()  # the guard, not the network
  c.optim.warmup_steps = 0  # the first step must move the parameters
  state = flow_step.create_state(jax.random.PRNGKey(0), c, (4, 4, 4, 8))
  step = jax.jit(skip_nonfinite(flow_step.make_train_step(c)))
  z = np.random.default_rng(0).standard_normal((2, 4, 4, 4, 8)).astype(np.float32)
  labels = np.array([0, 3], np.int32)  # the demo flow is stage-conditional
  good, m_good = step(state, {"image": z, "label": labels})
  z_bad = z.copy()  # not in place: the first step may still be reading `z`
  z_bad[1, 2, 3, 1, 5] = np.inf
  bad, m_bad = step(good, {"image": z_bad, "label": labels})
  assert float(m_good["skipped"]) == 0.0 and float(m_bad["skipped"]) == 1.0
  assert not np.isfinite(float(m_bad["loss"]))
  assert int(bad["step"]) == 2
  # Retrace guard: a new state and new batch values reuse the one compiled step.
  assert step._cache_size() == 1  # pylint: disable=protected-access
  changed = lambda a, b: any(
    np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  assert changed(state["params"], good["params"])
  for key in ("params", "ema_params", "opt", "rng"):
    assert not changed(good[key], bad[key]), key

"""Tests for latentfm.train.checkpoint."""

import hashlib
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latentfm.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(w_shape=(3, 4), seed=0):
  """A small train-state-like pytree with several dtypes."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = {
    "enc": {"w": normal(*w_shape), "b": normal(w_shape[-1]).astype(jnp.bfloat16)},
    "dec": {"w": normal(2, 2, 2, 1, 4)},
  }
  adam, empty = optax.adam(1e-3).init(params)
  adam = adam._replace(
    count=jnp.asarray(seed + 1, jnp.int32),
    mu=jax.tree.map(lambda p: normal(*p.shape).astype(p.dtype), params),
    nu=jax.tree.map(lambda p: normal(*p.shape).astype(p.dtype), params),
  )
  return {
    "params": params,
    "opt_state": (adam, empty),
    "step": jnp.asarray(11 + seed, jnp.int32),
    "codebook_initialised": jnp.asarray(seed % 2 == 0),
    "rng": jax.random.PRNGKey(seed + 100),
  }


def zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def assert_bit_exact(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def snapshot(directory):
  """Relative path -> content hash of every file under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
      else:
        out[rel] = "<dir>"
  return out


@pytest.fixture
def ckdir(tmp_path):
  return tmp_path / "ckpt"


def test_round_trip_bit_exact(ckdir):
  state = make_state()
  manager = ckpt.open_manager(ckdir)
  assert ckpt.latest_step(manager) is None
  assert ckpt.save(manager, 11, state)
  # No explicit wait: restore waits for the pending async save itself.
  restored, data_state, extra = ckpt.restore(manager, zeros_like(state))
  assert_bit_exact(restored, state)
  assert data_state is None and extra == {}
  assert restored["rng"].dtype == jnp.uint32
  assert restored["codebook_initialised"].dtype == jnp.bool_
  # Abstract targets work too.
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  restored, _, _ = ckpt.restore(manager, abstract, step=11)
  assert_bit_exact(restored, state)
  ckpt.close(manager)


def test_data_state_and_extra_round_trip(ckdir):
  state = make_state()
  data_state = {"epoch": 2, "raw": b"\x00\xff grain", "nested": [1, {"b": b""}]}
  extra = {
    "latent_mean": np.float32(0.5),
    "latent_std": np.array([1.0, 2.0]),
    "config": {"lr": 3e-4, "name": "thesis"},
  }
  manager = ckpt.open_manager(ckdir, async_save=False)
  ckpt.save(manager, 1, state, data_state=data_state, extra=extra)
  grain_like = b'{\n    "last_seen_indices": {"0": 7}\n}'
  ckpt.save(manager, 2, state, data_state=grain_like, extra={"k": [1, 2]})
  _, ds, ex = ckpt.restore(manager, state, step=1)
  assert ds == data_state
  assert ex == {
    "latent_mean": 0.5,
    "latent_std": [1.0, 2.0],
    "config": {"lr": 3e-4, "name": "thesis"},
  }
  _, ds, ex = ckpt.restore(manager, state)
  assert ds == grain_like and isinstance(ds, bytes)
  assert ex == {"k": [1, 2]}
  ckpt.close(manager)


def test_grain_iterator_state_round_trip(ckdir):
  grain = pytest.importorskip("grain.python")
  loader = grain.DataLoader(
    data_source=grain.RangeDataSource(0, 20, 1),
    sampler=grain.IndexSampler(20, grain.NoSharding(), shuffle=True, num_epochs=1, seed=0),
    worker_count=0,
  )
  it = iter(loader)
  for _ in range(5):
    next(it)
  manager = ckpt.open_manager(ckdir, async_save=False)
  ckpt.save(manager, 5, make_state(), data_state=it.get_state())
  expected = [next(it) for _ in range(5)]
  _, data_state, _ = ckpt.restore(manager, make_state())
  it2 = iter(loader)
  it2.set_state(data_state)
  assert [next(it2) for _ in range(5)] == expected
  ckpt.close(manager)


def test_keep_n_and_interval(ckdir):
  state = make_state()
  manager = ckpt.open_manager(ckdir, keep=2, save_interval_steps=2)
  saved = [ckpt.save(manager, s, state) for s in range(1, 9)]
  assert saved == [False, True, False, True, False, True, False, True]
  assert ckpt.save(manager, 9, state, force=True)
  assert not ckpt.save(manager, 9, state, force=True)  # already on disk
  ckpt.wait(manager)
  assert ckpt.all_steps(manager) == [8, 9]
  assert sorted(p for p in os.listdir(ckdir) if p.isdigit()) == ["8", "9"]
  ckpt.close(manager)


def test_resume_picks_latest(ckdir):
  manager = ckpt.open_manager(ckdir, keep=3)
  for step in (10, 20, 30):
    ckpt.save(manager, step, make_state(seed=step), extra={"step": step})
  ckpt.close(manager)
  manager = ckpt.open_manager(ckdir, keep=3)
  assert ckpt.latest_step(manager) == 30
  restored, _, extra = ckpt.restore(manager, zeros_like(make_state()))
  assert_bit_exact(restored, make_state(seed=30))
  assert extra == {"step": 30}
  ckpt.close(manager)


def test_async_save_copies_before_returning(ckdir):
  state = make_state()
  expected = jax.tree.map(np.asarray, state)
  manager = ckpt.open_manager(ckdir, async_save=True)
  ckpt.save(manager, 3, state)
  for leaf in jax.tree.leaves(state):
    leaf.delete()  # as if donated to the next train step
  ckpt.wait(manager)
  restored, _, _ = ckpt.restore(manager, zeros_like(make_state()))
  assert_bit_exact(restored, expected)
  ckpt.close(manager)


def test_mismatch_raises_and_leaves_checkpoint(ckdir):
  manager = ckpt.open_manager(ckdir)
  ckpt.save(manager, 4, make_state(), data_state={"i": 1})
  ckpt.wait(manager)
  before = snapshot(ckdir)

  with pytest.raises(ckpt.CheckpointMismatchError) as info:
    ckpt.restore(manager, make_state(w_shape=(3, 5)))
  msg = str(info.value)
  assert "\n" not in msg
  assert "params/enc/w has shape (3, 4) in the checkpoint but (3, 5)" in msg
  assert isinstance(info.value, ValueError)

  target = make_state()
  target["params"]["new"] = jnp.zeros((7,))
  del target["params"]["dec"]
  with pytest.raises(ckpt.CheckpointMismatchError) as info:
    ckpt.restore(manager, target)
  msg = str(info.value)
  assert ("params/new is in the target (shape (7,)) but not in the checkpoint") in msg
  assert "params/dec/w is in the checkpoint" in msg

  assert snapshot(ckdir) == before
  assert ckpt.latest_step(manager) == 4
  restored, data_state, _ = ckpt.restore(manager, make_state())
  assert_bit_exact(restored, make_state())
  assert data_state == {"i": 1}
  ckpt.close(manager)


def test_interrupted_save_is_ignored(ckdir):
  manager = ckpt.open_manager(ckdir)
  ckpt.save(manager, 1, make_state(seed=1))
  ckpt.save(manager, 2, make_state(seed=2))
  ckpt.close(manager)
  # What a crash in the middle of saving step 3 leaves behind.
  tmp = ckdir / "3.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\x00" * 16)

  manager = ckpt.open_manager(ckdir)
  assert ckpt.latest_step(manager) == 2
  assert ckpt.all_steps(manager) == [1, 2]
  restored, _, _ = ckpt.restore(manager, zeros_like(make_state()))
  assert_bit_exact(restored, make_state(seed=2))
  assert ckpt.save(manager, 3, make_state(seed=3))
  ckpt.wait(manager)
  assert ckpt.latest_step(manager) == 3
  assert not tmp.exists()
  ckpt.close(manager)


def test_missing_checkpoint_and_process_data(ckdir):
  manager = ckpt.open_manager(ckdir, async_save=False)
  with pytest.raises(FileNotFoundError):
    ckpt.restore(manager, make_state())
  ckpt.save(manager, 1, make_state(), data_state={"i": 3})
  with pytest.raises(FileNotFoundError):
    ckpt.restore(manager, make_state(), step=5)
  # Another process layout: this process has no data-iterator file.
  (data_file,) = (ckdir / "1" / "data").glob("process_*.json")
  data_file.rename(data_file.with_name("process_0-of-8.json"))
  _, data_state, _ = ckpt.restore(manager, make_state())
  assert data_state is None
  ckpt.close(manager)


def test_json_encoding():
  value = {"a": (1, b"\x01"), "b": np.int64(3), "c": None}
  assert ckpt.decode_json(ckpt.encode_json(value)) == {"a": [1, b"\x01"], "b": 3, "c": None}
  with pytest.raises(TypeError):
    ckpt.encode_json({"a": object()})
  with pytest.raises(TypeError):
    ckpt.encode_json({1: 2})


KILLED_SAVER = """
import sys
import jax.numpy as jnp
from latentfm.train import checkpoint as ckpt
manager = ckpt.open_manager(sys.argv[1])
size = int(sys.argv[2])
ckpt.save(manager, 1, {"w": jnp.full((size,), 1.0)}, data_state={"i": 1})
ckpt.wait(manager)
print("saved 1", flush=True)
ckpt.save(manager, 2, {"w": jnp.full((size,), 2.0)}, data_state={"i": 2})
ckpt.wait(manager)
print("saved 2", flush=True)
"""


def test_sigkill_during_save_keeps_last_good_checkpoint(ckdir):
  """A process killed while Orbax writes step 2 leaves step 1 intact and restorable."""
  size = 64 * 2**20  # 256 MB of float32: the write takes long enough to be caught mid-way
  proc = subprocess.Popen(
    [sys.executable, "-c", KILLED_SAVER, str(ckdir), str(size)],
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert proc.stdout.readline().strip() == "saved 1"
  tmp, final = ckdir / "2.orbax-checkpoint-tmp", ckdir / "2"
  deadline = time.time() + 60
  while not tmp.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.001)
  proc.kill()
  proc.wait()
  assert tmp.exists() and not final.exists(), "the save finished before the kill"

  manager = ckpt.open_manager(ckdir)
  assert ckpt.all_steps(manager) == [1]
  restored, data_state, _ = ckpt.restore(manager, {"w": jnp.zeros((size,))})
  assert float(restored["w"].min()) == float(restored["w"].max()) == 1.0
  assert data_state == {"i": 1}
  assert ckpt.save(manager, 2, {"w": jnp.full((size,), 3.0)})
  ckpt.wait(manager)
  assert ckpt.latest_step(manager) == 2 and not tmp.exists()
  ckpt.close(manager)

"""Verified checkpoints: a corrupt or truncated newest checkpoint is named in one line and the
restore falls back to the newest one that verifies; a NaN/Inf state is never saved."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from latentfm.train import checkpoint as ckpt


def state(seed):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32),
    "step": jnp.asarray(seed, jnp.int32),
  }


def largest_array_file(step_dir):
  files = [
    os.path.join(r, f)
    for r, _, fs in os.walk(os.path.join(step_dir, "state"))
    for f in fs
    if os.sep + "d" + os.sep in os.path.join(r, f)
  ]
  return max(files, key=os.path.getsize)


@pytest.fixture
def two_steps(tmp_path):
  directory = tmp_path / "ckpt"
  manager = ckpt.open_manager(directory, async_save=False)
  ckpt.save(manager, 2, state(2), extra={"k": 2})
  ckpt.save(manager, 4, state(4), extra={"k": 4})
  ckpt.close(manager)
  return directory


def flip_bytes(path):
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
  open(path, "wb").write(bytes(data))


def truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 3])


@pytest.mark.parametrize("damage", [flip_bytes, truncate])
def test_corrupt_newest_falls_back_to_the_one_before(two_steps, damage):
  damage(largest_array_file(two_steps / "4"))
  manager = ckpt.open_manager(two_steps, async_save=False)
  with pytest.raises(ckpt.CorruptCheckpointError, match="step 4"):
    ckpt.restore(manager, state(0))
  reports = []
  restored, _, extra, step = ckpt.restore_newest_good(manager, state(0), report=reports.append)
  assert step == 2 and extra == {"k": 2}
  np.testing.assert_array_equal(restored["w"], state(2)["w"])
  assert len(reports) == 1 and "\n" not in reports[0] and "step 4" in reports[0]
  # Kept for inspection, out of the way: the run can save step 4 again.
  assert (two_steps / "corrupt-4").is_dir() and not (two_steps / "4").exists()
  assert ckpt.all_steps(manager) == [2]
  assert ckpt.save(manager, 4, state(5), force=True)
  ckpt.close(manager)


def test_no_good_checkpoint_is_one_error(two_steps):
  for step in ("2", "4"):
    flip_bytes(largest_array_file(two_steps / step))
  manager = ckpt.open_manager(two_steps, async_save=False)
  with pytest.raises(ckpt.CorruptCheckpointError, match=r"no readable checkpoint .*\[4, 2\]"):
    ckpt.restore_newest_good(manager, state(0), report=lambda _: None, set_aside=False)
  assert (two_steps / "4").is_dir()  # set_aside=False leaves the directory as it was
  ckpt.close(manager)


def test_nonfinite_state_is_never_saved(tmp_path):
  manager = ckpt.open_manager(tmp_path / "ckpt", async_save=False)
  bad = state(1)
  bad["w"] = bad["w"].at[3, 3].set(jnp.nan)
  with pytest.raises(ckpt.NonFiniteStateError, match=r"step 7: .*\['w'\]"):
    ckpt.save(manager, 7, bad, force=True)
  assert ckpt.all_steps(manager) == []
  bf16 = {"w": jnp.full((2,), jnp.inf, jnp.bfloat16), "n": jnp.ones((2,), jnp.int32)}
  with pytest.raises(ckpt.NonFiniteStateError):
    ckpt.save(manager, 8, bf16, force=True)
  ckpt.close(manager)


def test_digest_changes_with_any_bit():
  from latentfm.train.state_digest import inspect  # pylint: disable=import-outside-toplevel

  a, b = state(3), state(3)
  assert inspect(a) == inspect(b) and inspect(a)[1] == []
  b["w"] = b["w"].at[10, 10].set(jnp.nextafter(b["w"][10, 10], jnp.inf))
  assert inspect(a)[0] != inspect(b)[0]
  renamed = {"v": a["w"], "step": a["step"]}
  assert inspect(a)[0] != inspect(renamed)[0]

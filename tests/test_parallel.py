"""Tests for latentfm.train.parallel."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from latentfm.train import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs with 4 fake CPU devices; XLA_FLAGS must be set before jax is imported.
_FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, pytest
    from latentfm.train import checkpoint as ckpt, parallel

    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.shape == (4,)

    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    batch = parallel.shard_batch({"x": x, "y": np.arange(8)}, mesh)
    assert batch["x"].shape == (8, 3)
    assert batch["x"].sharding == parallel.batch_sharding(mesh)
    shards = sorted(batch["x"].addressable_shards,
                    key=lambda s: s.index[0].start)
    assert len(shards) == 4
    for i, shard in enumerate(shards):
      assert shard.data.shape == (2, 3)
      np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i:2 * i + 2])

    state = parallel.replicate({"w": jnp.ones((3,)), "step": 0}, mesh)
    assert state["w"].sharding.is_fully_replicated
    assert len(state["w"].addressable_shards) == 4

    @jax.jit
    def mean(state, batch):
      return jnp.mean(batch["x"] * state["w"], axis=0)

    np.testing.assert_allclose(np.asarray(mean(state, batch)), x.mean(0),
                               rtol=1e-6)

    with pytest.raises(ValueError, match=r"size 6 .* local devices \\(4\\)"):
      parallel.shard_batch({"x": np.zeros((6, 3))}, mesh)
    with pytest.raises(ValueError, match=r"number of devices \\(4\\)"):
      parallel.process_batch_size(6)
    assert parallel.process_batch_size(8) == 8
    sub = parallel.make_mesh(jax.devices()[:2])
    assert sub.devices.shape == (2,)

    # Sharded state restores with the target's shardings.
    manager = ckpt.open_manager(sys.argv[1])
    saved = {"w": state["w"], "rows": batch["x"]}
    ckpt.save(manager, 1, saved)
    target = {"w": jax.device_put(jnp.zeros((3,)), parallel.replicated(sub)),
              "rows": jax.device_put(jnp.zeros((8, 3)),
                                     parallel.batch_sharding(sub))}
    restored, _, _ = ckpt.restore(manager, target)
    ckpt.close(manager)
    for name in ("w", "rows"):
      assert restored[name].sharding == target[name].sharding, name
      np.testing.assert_array_equal(np.asarray(restored[name]),
                                    np.asarray(saved[name]))
    print("OK")
""")


def test_four_cpu_devices(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  result = subprocess.run(
    [sys.executable, "-c", _FOUR_DEVICES, str(tmp_path / "ckpt")],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")


def test_single_device_in_process():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",)
  n = jax.device_count()
  batch = parallel.shard_batch(np.ones((2 * n, 4), np.float32), mesh)
  assert batch.shape == (2 * n, 4)
  with pytest.raises(ValueError, match="leading batch axis"):
    parallel.shard_batch({"s": np.float32(1.0)}, mesh)


def test_process_batch_size_errors():
  with pytest.raises(ValueError, match="positive"):
    parallel.process_batch_size(0)
  assert parallel.process_batch_size(4 * jax.device_count()) == (
    4 * jax.device_count() // jax.process_count()
  )


def test_maybe_initialize_distributed_is_noop(monkeypatch):
  for name in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    parallel.AUTO_DETECT_ENV,
  ):
    monkeypatch.delenv(name, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert not parallel.maybe_initialize_distributed({"JAX_NUM_PROCESSES": "1"})
  assert parallel.maybe_initialize_distributed({"HOME": "/x"}) is False
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1
  with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer"):
    parallel.maybe_initialize_distributed({"JAX_PROCESS_ID": "zero"})


def test_maybe_initialize_distributed_passes_env(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": "1",
  }
  assert parallel.maybe_initialize_distributed(env) is True
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
  assert parallel.maybe_initialize_distributed({parallel.AUTO_DETECT_ENV: "auto"}) is True
  assert calls[-1] == {"coordinator_address": None, "num_processes": None, "process_id": None}


# Trains the flow step for 3 steps on a global batch of 4, split over however many processes
# run it; saves and restores a checkpoint; prints losses and a digest of the parameters.
_TRAIN_FEW_STEPS = textwrap.dedent("""
    import hashlib, json, sys
    import jax, numpy as np
    from experiments.configs import flow as flow_configs
    from latentfm.train import checkpoint as ckpt, flow_step, parallel

    parallel.maybe_initialize_distributed()
    pid, n = jax.process_index(), jax.process_count()
    mesh = parallel.make_mesh()
    c = flow_configs.get_config("demo")
    c.model.channels, c.model.time_embed_dim = 8, 16
    c.model.channel_mults, c.model.attention_levels = (1,), ()
    state = parallel.replicate(
        flow_step.create_state(jax.random.PRNGKey(0), c, (4, 4, 4, 8)), mesh)
    step = jax.jit(flow_step.make_train_step(c), donate_argnums=0)
    rng, share, losses = np.random.default_rng(0), 4 // n, []
    for _ in range(3):
      z = rng.standard_normal((4, 4, 4, 4, 8)).astype(np.float32)
      labels = np.arange(4, dtype=np.int32)  # the demo flow is stage-conditional
      batch = parallel.shard_batch({"image": z[pid * share:(pid + 1) * share],
                                    "label": labels[pid * share:(pid + 1) * share]}, mesh)
      state, metrics = step(state, batch)
      losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    manager = ckpt.open_manager(sys.argv[1])
    ckpt.save(manager, 3, state, data_state={"process": pid})
    ckpt.wait(manager)
    restored, data_state, _ = ckpt.restore(manager, state)
    ckpt.close(manager)
    host = lambda tree: [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]
    assert all(np.array_equal(a, b) for a, b in zip(host(restored), host(state)))
    assert data_state == {"process": pid}
    params = host(state["params"])
    print(json.dumps({"process": pid, "count": n, "devices": jax.device_count(),
                      "losses": losses, "params": [float(p.sum()) for p in params],
                      "sha256": hashlib.sha256(b"".join(p.tobytes() for p in params)).hexdigest()}))
""")


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_and_match_one(tmp_path):
  """Two JAX processes on localhost (jax.distributed, Gloo CPU collectives) vs one."""
  import json  # pylint: disable=import-outside-toplevel

  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  coordinator = f"localhost:{_free_port()}"
  envs = [
    dict(base, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    for i in range(2)
  ] + [base]
  dirs = [tmp_path / "two", tmp_path / "two", tmp_path / "one"]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _TRAIN_FEW_STEPS, str(d)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for env, d in zip(envs, dirs)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  first, second, single = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
  assert (first["process"], second["process"], first["count"], single["count"]) == (0, 1, 2, 1)
  assert first["devices"] == 2 and single["devices"] == 1
  assert first["losses"] == second["losses"] and first["sha256"] == second["sha256"]
  np.testing.assert_allclose(first["losses"], single["losses"], rtol=1e-5)
  np.testing.assert_allclose(first["params"], single["params"], rtol=1e-4, atol=1e-5)
  assert sorted(p.name for p in (tmp_path / "two" / "3" / "data").glob("process_*")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]

"""One train step sharded over 4 forced CPU devices equals the single-device step."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  from latentfm.train import parallel
  from experiments.configs import flow as flow_configs
  from latentfm.train import flow_step, vqgan_step
  import sys
  sys.path.insert(0, "tests")
  from testing_support import tiny_vqgan_config as tiny_config
  assert jax.device_count() == 4
  rng = np.random.default_rng(0)

  def compare(state, step, batch):
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = parallel.make_mesh(devices)
      s = parallel.replicate(state, mesh)
      b = parallel.shard_batch(batch, mesh)
      new, metrics = jax.jit(step)(s, b)
      outs.append((jax.device_get(new), jax.device_get(metrics)))
    (a, ma), (b, mb) = outs
    err = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    merr = max(abs(float(ma[k]) - float(mb[k])) for k in ma)
    return err, merr

  c = flow_configs.get_config("demo")
  c.model.channels = 8
  c.model.time_embed_dim = 16
  c.model.channel_mults, c.model.attention_levels = (1,), ()
  z = {"image": rng.standard_normal((4, 4, 4, 4, 8)).astype(np.float32),
       "label": np.arange(4, dtype=np.int32)}  # the demo flow is stage-conditional
  state = flow_step.create_state(jax.random.PRNGKey(0), c, (4, 4, 4, 8))
  print("flow", *compare(state, flow_step.make_train_step(c), z))

  c = tiny_config()
  c.train.batch_size = 4
  # Adam's first update is lr * g / (|g| + eps): parameters whose true gradient is zero (biases
  # in front of a per-channel GroupNorm) get rounding-level gradients that it maps to +-lr, so
  # a small lr keeps that amplified noise below the tolerance; losses and the gradient norm
  # (in the metrics) are compared exactly as well.
  c.optim.lr = 1e-6
  x = {"image": rng.random((4, 16, 16, 16, 1), dtype=np.float32)}
  state = vqgan_step.create_state(jax.random.PRNGKey(0), c)
  step = vqgan_step.make_train_step(c, use_gan=False)
  print("vqgan", *compare(state, lambda s, b: step(s, b, None), x))
""")


def test_four_devices_match_one():
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
  )
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  errors = {
    line.split()[0]: [float(v) for v in line.split()[1:]]
    for line in result.stdout.splitlines()
    if line.split()
  }
  assert set(errors) == {"flow", "vqgan"}
  for name, (param_err, metric_err) in errors.items():
    assert param_err < 1e-5 and metric_err < 1e-5, (name, param_err, metric_err)

"""The PyTorch modules of the benchmarks compute what the JAX modules compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentfm.nn.unet3d import UNet3D

torch = pytest.importorskip("torch", reason="the PyTorch benchmark modules need the test extra")
from bench.torch_models import FlowUNet3d, load_flax_unet  # pylint: disable=wrong-import-position


def test_thesis_unet_parameter_count():
  assert sum(p.numel() for p in FlowUNet3d().parameters()) == 37_910_568


def test_unet_matches_jax_with_ported_weights():
  cfg = dict(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
             num_heads=2, time_embed_dim=16, time_scale=10.0)
  model = UNet3D(**cfg)
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 4, 4, 4, 4)).astype(np.float32)
  t = np.array([0.2, 0.9], np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(z), jnp.asarray(t))["params"]
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.2, p.shape), jnp.float32), params)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, z, t))

  ref = FlowUNet3d(in_channels=4, channels=8, mults=(1, 2), num_res_blocks=1,
                   attention_levels=(1,), heads=2, dropout=0.0, tdim=16, time_scale=10.0)
  load_flax_unet(ref, jax.device_get(params)).eval()
  with torch.no_grad():
    theirs = ref(torch.from_numpy(z.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t))
  theirs = theirs.numpy().transpose(0, 2, 3, 4, 1)
  assert sum(p.numel() for p in ref.parameters()) == sum(x.size for x in jax.tree.leaves(params))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())

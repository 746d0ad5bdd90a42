"""The 128³ preset pair: one downsampling stage, bfloat16 and remat, a flow that fits its latent."""

import jax
import jax.numpy as jnp

from experiments import vqgan as vqgan_stage
from experiments.configs import flow as flow_configs
from experiments.configs import vqgan as vqgan_configs
from latentfm.nn.vqgan import VQGAN


def test_res128_pair_shapes():
  vq = vqgan_configs.get_config("res128")
  vqgan_stage.validate_config(vq)
  assert (vq.data.shape, vq.model.downsample) == ((128, 128, 128), (2, 2, 2))
  assert (vq.model.dtype, vq.model.remat) == ("bfloat16", True)
  model = VQGAN.from_config(vq.model)
  x = jax.ShapeDtypeStruct((1, 128, 128, 128, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  latent = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, x)
  assert latent.shape == (1, 64, 64, 64, 8) and latent.dtype == jnp.float32
  fl = flow_configs.get_config("res128")
  assert (fl.model.dtype, fl.model.remat, fl.model.attention_levels) == ("bfloat16", True, (3,))
  levels = len(fl.model.channel_mults)
  assert all(n % 2 ** (levels - 1) == 0 for n in latent.shape[1:4])  # experiments.flow's rule
  assert max(fl.model.attention_levels) == levels - 1  # attention only at 64 / 8 = 8³

"""Tiled decoding gives the whole-volume decode; its blend weights are a partition of unity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentfm import sample, tiled_decode
from latentfm.flow import LatentStats
from latentfm.nn import layers
from latentfm.nn.vqgan import VQGAN, from_model_range

# One lax convolution per layer: these tests compile the decoder once per GroupNorm, and the CPU
# formulations compute the same numbers at a longer compile.
pytestmark = pytest.mark.usefixtures("lax_convs")


@pytest.fixture
def lax_convs():
  with layers.use_conv_impl("lax"):
    yield


LATENT = (18, 6, 6)


def test_tiles_cover_and_weights_sum_to_one_outside_the_margins():
  starts = tiled_decode.tile_starts(18, 13, 10)
  assert starts[0] == 0 and starts[-1] == 5 and len(starts) == 3
  assert tiled_decode.tile_starts(6, 8, 10) == [0]
  w = tiled_decode.blend_weights(18, starts, 13, 2, margin=4)
  np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
  centres = (np.arange(36) + 0.5) / 2
  for i, a in enumerate(starts):
    inner = ((centres < a + 4) if i > 0 else False) | ((centres > a + 13 - 4) if i < 2 else False)
    assert np.all(w[i][inner] == 0.0)  # nothing from where the tile's padding reaches
  with pytest.raises(ValueError, match="overlap"):
    tiled_decode.tile_starts(18, 8, 8)


def tiny_vqgan():
  model = VQGAN(n_hiddens=4, downsample=(2, 2, 2), embedding_dim=4, n_codes=8)
  shape = (1,) + tuple(2 * n for n in LATENT) + (1,)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros(shape))


def latents():
  """Noise on a ramp along the tiled axis, so that a tile's own statistics are not the
  volume's."""
  z = np.random.default_rng(0).normal(size=(2,) + LATENT + (4,))
  return jnp.asarray(z + 3 * np.linspace(-1, 1, LATENT[0])[None, :, None, None, None], jnp.float32)


def test_tiled_decode_equals_whole_volume_decode():
  """With the default overlap (twice the decoder's margin plus 2) the tiles give the whole
  decode up to float rounding; a thin overlap or each tile's own GroupNorm statistics do not,
  which is what the tolerance guards against."""
  model, variables = tiny_vqgan()
  z = latents()
  whole = np.asarray(from_model_range(model.apply(variables, z, method=model.decode))[..., 0])
  assert tiled_decode.decoder_margin(model) == 4  # 1 + 4 / 2 + 1 / 2 latent voxels
  # An axis kept at each stage: 2 (4-tap kernel at stride 1) + 4 per stage, + 1.
  assert tiled_decode.decoder_margin(model.clone(downsample=(4, 4, 1))) == 13
  tiled = tiled_decode.decode_tiled(model, variables, z, (13, 6, 6))
  error = np.abs(tiled - whole).max()
  thin = np.abs(tiled_decode.decode_tiled(model, variables, z, (13, 6, 6), overlap=4) - whole).max()
  own = np.abs(
    tiled_decode.decode_tiled(model, variables, z, (13, 6, 6), global_norms=False) - whole
  ).max()
  print(f"max |tiled - whole|: {error:.2e}; overlap 4: {thin:.2e}; own statistics: {own:.2e}")
  assert error < 1e-5
  assert thin > 1e-3 and own > 1e-2


def test_sample_decode_with_tiles_and_snapping():
  model, variables = tiny_vqgan()
  stats = LatentStats(mean=jnp.full((4,), 0.5), std=jnp.full((4,), 2.0))
  models = sample.Models(
    velocity=None,
    vqgan=model,
    vqgan_variables=variables,
    stats=stats,
    latent_shape=LATENT + (4,),
    flow_step=0,
    vqgan_step=0,
  )
  z0 = latents()
  for snap in (False, True):
    whole = np.asarray(sample.decode(models, z0, snap))
    tiled = np.asarray(sample.decode(models, z0, snap, tile=13))
    np.testing.assert_allclose(tiled, whole, atol=1e-5)

r"""Tiled against whole-volume decoding: largest difference, and compiled memory at 128³.

  python -m bench.tiled_decode [--tile 32] [--error_latent 24]

Memory: the `vqgan.py:res128` decoder (bfloat16, 64³ x 8 latent -> 128³), batch 1, compiled
for this machine's default backend with one `lax` convolution per layer (the accelerators'
formulation), shapes only: XLA's temporary buffers plus the output of the whole decode against
the largest of the tiled decode's passes (one tile each). Error: a randomly initialised decoder
of the same layout in float32, decoded whole and in tiles of 2/3 of a latent of `error_latent`³
(27 tiles; random weights and a ramp in the latent, so that the tiles' own statistics differ
from the volume's).
"""

from __future__ import annotations

import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

flags.DEFINE_integer("tile", 32, "Tile size in latent voxels for the 128³ memory figures.")
flags.DEFINE_integer("error_latent", 24, "Latent side of the error measurement.")
FLAGS = flags.FLAGS


def _bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def memory(tile: int) -> dict:
  """Compiled temporary + output bytes: whole decode and the largest tiled pass."""
  # pylint: disable=import-outside-toplevel,protected-access
  from experiments.configs.vqgan import get_config
  from latentfm import tiled_decode
  from latentfm.nn.vqgan import VQGAN, from_model_range

  model = VQGAN.from_config(get_config("res128").model).clone(remat=False)
  latent = jax.ShapeDtypeStruct((1, 64, 64, 64, model.embedding_dim), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 128, 1)))
  whole = jax.jit(lambda v, z: from_model_range(model.apply(v, z, method=model.decode)))
  out = {"whole": _bytes(whole.lower(variables, latent).compile())}
  z_tile = jax.ShapeDtypeStruct((1, tile, tile, tile, model.embedding_dim), jnp.float32)
  shapes = tiled_decode.norm_input_shapes(model, variables, z_tile)
  fixed = []
  passes = []
  for k, shape in enumerate(shapes + [None]):
    weights = {} if shape is None else {shape: jax.ShapeDtypeStruct(shape, jnp.float32)}
    lowered = tiled_decode._pass.lower(
      model, variables, z_tile, tuple(fixed), None if shape is None else k, weights
    )
    passes.append(_bytes(lowered.compile()))
    groups = jax.ShapeDtypeStruct((1, min(32, 2 * model.n_hiddens)), jnp.float32)
    fixed.append((groups, groups))
  out["tiled_largest_pass"] = max(passes)
  out["passes"] = len(passes)
  return out


def error(latent: int) -> dict:
  """Largest |tiled - whole| of a random decoder, (2, 2, 2), for both norm modes."""
  # pylint: disable=import-outside-toplevel
  from latentfm import tiled_decode
  from latentfm.nn.vqgan import VQGAN, from_model_range

  model = VQGAN(n_hiddens=16, downsample=(2, 2, 2), embedding_dim=8, n_codes=64)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 16, 1)))
  rng = np.random.default_rng(0)
  z = rng.normal(size=(1, latent, latent, latent, 8))
  z = jnp.asarray(z + 3 * np.linspace(-1, 1, latent)[None, :, None, None, None], jnp.float32)
  whole = np.asarray(from_model_range(model.apply(variables, z, method=model.decode))[..., 0])
  tile = max(2 * latent // 3, 2 * tiled_decode.decoder_margin(model) + 3)
  return {
    f"tile {tile}, {name}": float(
      np.abs(
        tiled_decode.decode_tiled(model, variables, z, tile, global_norms=global_norms) - whole
      ).max()
    )
    for name, global_norms in (("volume statistics", True), ("own statistics", False))
  }


def main(argv: list[str]) -> None:
  del argv
  from latentfm.nn import layers  # pylint: disable=import-outside-toplevel

  with layers.use_conv_impl("lax"):
    m = memory(FLAGS.tile)
    print(
      f"128³ res128 decoder, batch 1 ({jax.default_backend()}): whole decode "
      f"{m['whole'] / 2**20:.0f} MiB; tiles of {FLAGS.tile}³ latent voxels: largest of "
      f"{m['passes']} passes {m['tiled_largest_pass'] / 2**20:.0f} MiB "
      f"({m['whole'] / m['tiled_largest_pass']:.1f}x less)"
    )
    for name, value in error(FLAGS.error_latent).items():
      print(f"max |tiled - whole| at {FLAGS.error_latent}³ latent, {name}: {value:.2e}")


if __name__ == "__main__":
  app.run(main, sys.argv)

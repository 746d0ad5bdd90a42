"""PatchGAN discriminators (pix2pixHD `NLayerDiscriminator`) for 2D slices and 3D volumes.

Layers (kernel 4, zero padding 2 on every side):
  block_0:               conv s2 -> LeakyReLU(0.2)
  block_n, n < layers:   conv s2 -> BatchNorm -> LeakyReLU(0.2)
  block_layers:          conv s1 -> BatchNorm -> LeakyReLU(0.2)
  logits:                conv s1 -> 1 channel
with min(channels * 2^n, 512) channels in block n. BatchNorm uses PyTorch's defaults
(momentum 0.1, i.e. flax momentum 0.9; eps 1e-5); running statistics live in `"batch_stats"`.
`dtype` is the computation dtype (parameters and statistics stay float32; outputs are float32);
`conv_impl` the convolutions' implementation (`latentfm.nn.layers`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from latentfm.nn.layers import ZeroPadConv

Array = jax.Array


class PatchDiscriminator(nn.Module):
  """Patch discriminator over channels-last 2D (B, H, W, C) or 3D (B, D, H, W, C) inputs."""

  channels: int = 64
  num_layers: int = 3
  spatial_dims: int = 3
  dtype: Any = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, list[Array]]:
    """Returns `(logits, features)`; features are the num_layers + 1 block outputs."""
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"expected {self.spatial_dims + 2}-d input, got shape {x.shape}")
    features = []
    conv = lambda f, s, name: ZeroPadConv(
      f, 4, s, 2, dtype=self.dtype, conv_impl=self.conv_impl, name=name
    )
    h = conv(self.channels, 2, "conv_0")(x)
    h = nn.leaky_relu(h, 0.2)
    features.append(h)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = conv(min(self.channels * 2**n, 512), stride, f"conv_{n}")(h)
      h = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        name=f"norm_{n}",
      )(h)
      h = nn.leaky_relu(h, 0.2)
      features.append(h)
    logits = conv(1, 1, "conv_out")(h)
    return logits.astype(jnp.float32), [f.astype(jnp.float32) for f in features]


def make_discriminators(
  model: ml_collections.ConfigDict,
) -> tuple[PatchDiscriminator, PatchDiscriminator]:
  """The (2D slice, 3D volume) discriminators of a VQ-GAN config's `model` section."""
  dtype, impl = jnp.dtype(model.get("dtype", "float32")), model.get("conv_impl", "auto")
  return (
    PatchDiscriminator(model.disc_channels, model.disc_layers, 2, dtype, impl),
    PatchDiscriminator(model.disc_channels, model.disc_layers, 3, dtype, impl),
  )


def output_size(size: int, num_layers: int) -> int:
  """Spatial size of the logits for an input of `size` along one axis."""
  for _ in range(num_layers):
    size = size // 2 + 1
  return size + 2

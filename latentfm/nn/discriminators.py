"""PatchGAN discriminators (pix2pixHD `NLayerDiscriminator`) for 2D slices and 3D volumes.

Layers (kernel 4, zero padding 2 on every side):
  block_0:               conv s2 -> LeakyReLU(0.2)
  block_n, n < layers:   conv s2 -> BatchNorm -> LeakyReLU(0.2)
  block_layers:          conv s1 -> BatchNorm -> LeakyReLU(0.2)
  logits:                conv s1 -> 1 channel
with min(channels * 2^n, 512) channels in block n. BatchNorm uses PyTorch's defaults
(momentum 0.1, i.e. flax momentum 0.9; eps 1e-5); running statistics live in `"batch_stats"`.
"""

import flax.linen as nn
import jax
import ml_collections

from latentfm.nn.layers import ZeroPadConv

Array = jax.Array


class PatchDiscriminator(nn.Module):
  """Patch discriminator over channels-last 2D (B, H, W, C) or 3D (B, D, H, W, C) inputs."""
  channels: int = 64
  num_layers: int = 3
  spatial_dims: int = 3

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, list[Array]]:
    """Returns `(logits, features)`; features are the num_layers + 1 block outputs."""
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"expected {self.spatial_dims + 2}-d input, got shape {x.shape}")
    features = []
    h = ZeroPadConv(self.channels, 4, 2, 2, name="conv_0")(x)
    h = nn.leaky_relu(h, 0.2)
    features.append(h)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = ZeroPadConv(min(self.channels * 2**n, 512), 4, stride, 2, name=f"conv_{n}")(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       name=f"norm_{n}")(h)
      h = nn.leaky_relu(h, 0.2)
      features.append(h)
    logits = ZeroPadConv(1, 4, 1, 2, name="conv_out")(h)
    return logits, features


def make_discriminators(
    model: ml_collections.ConfigDict) -> tuple[PatchDiscriminator, PatchDiscriminator]:
  """The (2D slice, 3D volume) discriminators of a VQ-GAN config's `model` section."""
  return (PatchDiscriminator(model.disc_channels, model.disc_layers, spatial_dims=2),
          PatchDiscriminator(model.disc_channels, model.disc_layers, spatial_dims=3))


def output_size(size: int, num_layers: int) -> int:
  """Spatial size of the logits for an input of `size` along one axis."""
  for _ in range(num_layers):
    size = size // 2 + 1
  return size + 2


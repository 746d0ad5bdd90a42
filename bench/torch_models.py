"""The thesis VQ-GAN autoencoder in PyTorch, layer for layer as `latentfm.nn.vqgan` (benchmarks).

Same-padding convs replicate-pad by k - s (left = ceil) and then convolve without padding;
transposed convs replicate-pad the input by (k - s) and use padding k - 1, as DESIGN.md states.
"""

import torch
from torch import nn
import torch.nn.functional as F


def _pads(k: int, s: int) -> tuple[int, ...]:
  p = k - s
  return (p - p // 2, p // 2) * 3


class SamePadConv3d(nn.Module):

  def __init__(self, cin: int, cout: int, k: int, s: int = 1):
    super().__init__()
    self.pad = _pads(k, s)
    self.conv = nn.Conv3d(cin, cout, k, s)

  def forward(self, x):
    return self.conv(F.pad(x, self.pad, mode="replicate"))


class SamePadConvTranspose3d(nn.Module):

  def __init__(self, cin: int, cout: int, k: int = 4, s: int = 2):
    super().__init__()
    self.pad = _pads(k, s)
    self.conv = nn.ConvTranspose3d(cin, cout, k, s, padding=k - 1)

  def forward(self, x):
    return self.conv(F.pad(x, self.pad, mode="replicate"))


class ResBlock(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.norm1 = nn.GroupNorm(min(32, c), c, eps=1e-6)
    self.conv1 = SamePadConv3d(c, c, 3)
    self.norm2 = nn.GroupNorm(min(32, c), c, eps=1e-6)
    self.conv2 = SamePadConv3d(c, c, 3)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    return x + self.conv2(F.silu(self.norm2(h)))


class ThesisAutoencoder(nn.Module):
  """Encoder → pre-VQ conv → post-VQ conv → decoder of the thesis configuration."""

  def __init__(self, n: int = 16, emb: int = 8):
    super().__init__()
    self.encoder = nn.Sequential(
        SamePadConv3d(1, n, 3), SamePadConv3d(n, 2 * n, 4, 2), ResBlock(2 * n),
        SamePadConv3d(2 * n, 4 * n, 4, 2), ResBlock(4 * n), nn.GroupNorm(32, 4 * n, eps=1e-6),
        nn.SiLU())
    self.pre_vq = nn.Conv3d(4 * n, emb, 1)
    self.post_vq = nn.Conv3d(emb, 4 * n, 1)
    self.decoder = nn.Sequential(
        nn.GroupNorm(32, 4 * n, eps=1e-6), nn.SiLU(), SamePadConvTranspose3d(4 * n, 4 * n),
        ResBlock(4 * n), ResBlock(4 * n), SamePadConvTranspose3d(4 * n, 2 * n),
        ResBlock(2 * n), ResBlock(2 * n), SamePadConv3d(2 * n, 1, 3))

  def forward(self, x):
    return self.decoder(self.post_vq(self.pre_vq(self.encoder(x))))

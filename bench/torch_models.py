"""The thesis VQ-GAN autoencoder in PyTorch, layer for layer as `latentfm.nn.vqgan` (benchmarks).

Same-padding convs replicate-pad by k - s (left = ceil) and then convolve without padding;
transposed convs replicate-pad the input by (k - s) and use padding k - 1, as DESIGN.md states.
"""

import math

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
      SamePadConv3d(1, n, 3),
      SamePadConv3d(n, 2 * n, 4, 2),
      ResBlock(2 * n),
      SamePadConv3d(2 * n, 4 * n, 4, 2),
      ResBlock(4 * n),
      nn.GroupNorm(32, 4 * n, eps=1e-6),
      nn.SiLU(),
    )
    self.pre_vq = nn.Conv3d(4 * n, emb, 1)
    self.post_vq = nn.Conv3d(emb, 4 * n, 1)
    self.decoder = nn.Sequential(
      nn.GroupNorm(32, 4 * n, eps=1e-6),
      nn.SiLU(),
      SamePadConvTranspose3d(4 * n, 4 * n),
      ResBlock(4 * n),
      ResBlock(4 * n),
      SamePadConvTranspose3d(4 * n, 2 * n),
      ResBlock(2 * n),
      ResBlock(2 * n),
      SamePadConv3d(2 * n, 1, 3),
    )

  def forward(self, x):
    return self.decoder(self.post_vq(self.pre_vq(self.encoder(x))))


def _groups(c: int, max_groups: int = 32) -> int:
  """The GroupNorm group count of `latentfm.nn.unet3d._norm` (>= 4 channels per group)."""
  import math  # pylint: disable=import-outside-toplevel

  g = math.gcd(c, max_groups)
  return max([d for d in range(1, g + 1) if g % d == 0 and c // d >= 4], default=1)


class FlowResBlock(nn.Module):
  def __init__(self, cin: int, cout: int, tdim: int, dropout: float):
    super().__init__()
    self.norm1, self.conv1 = (
      nn.GroupNorm(_groups(cin), cin, eps=1e-6),
      nn.Conv3d(cin, cout, 3, padding=1),
    )
    self.time_proj = nn.Linear(tdim, cout)
    self.norm2, self.conv2 = (
      nn.GroupNorm(_groups(cout), cout, eps=1e-6),
      nn.Conv3d(cout, cout, 3, padding=1),
    )
    self.dropout = nn.Dropout(dropout)
    self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(F.silu(temb))[:, :, None, None, None]
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    return self.skip(x) + h


class FlowAttention(nn.Module):
  def __init__(self, c: int, heads: int):
    super().__init__()
    self.norm, self.heads = nn.GroupNorm(_groups(c), c, eps=1e-6), heads
    self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

  def forward(self, x):
    b, c = x.shape[:2]
    h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = self.qkv(h).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
    return x + self.proj(h).transpose(1, 2).reshape(x.shape)


class ResAttn(nn.Module):
  """A residual block, followed by self-attention at attention levels."""

  def __init__(self, res: FlowResBlock, attn: nn.Module | None):
    super().__init__()
    self.res, self.attn = res, attn if attn is not None else nn.Identity()

  def forward(self, x, temb):
    return self.attn(self.res(x, temb))


class FlowUNet3d(nn.Module):
  """`latentfm.nn.unet3d.UNet3D`, layer for layer (same parameter count for the same config)."""

  def __init__(
    self,
    in_channels=8,
    channels=80,
    mults=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_levels=(2, 3),
    heads=4,
    dropout=0.5,
    tdim=320,
    time_scale=1000.0,
  ):
    super().__init__()
    self.channels, self.time_scale = channels, time_scale
    self.time_mlp = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
    self.stem = nn.Conv3d(in_channels, channels, 3, padding=1)
    self.down, skip_ch, ch = nn.ModuleList(), [channels], channels
    for level, mult in enumerate(mults):
      for _ in range(num_res_blocks):
        attn = FlowAttention(channels * mult, heads) if level in attention_levels else None
        self.down.append(ResAttn(FlowResBlock(ch, channels * mult, tdim, dropout), attn))
        ch = channels * mult
        skip_ch.append(ch)
      if level < len(mults) - 1:
        self.down.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))
        skip_ch.append(ch)
    mid_attn = len(mults) - 1 in attention_levels
    self.mid = nn.ModuleList(
      [FlowResBlock(ch, ch, tdim, dropout)]
      + ([FlowAttention(ch, heads)] if mid_attn else [])
      + [FlowResBlock(ch, ch, tdim, dropout)]
    )
    self.up = nn.ModuleList()
    for level in reversed(range(len(mults))):
      for _ in range(num_res_blocks + 1):
        out = channels * mults[level]
        attn = FlowAttention(out, heads) if level in attention_levels else None
        self.up.append(ResAttn(FlowResBlock(ch + skip_ch.pop(), out, tdim, dropout), attn))
        ch = out
      if level > 0:
        self.up.append(
          nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(ch, ch, 3, padding=1)
          )
        )
    self.out_norm = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
    self.out = nn.Conv3d(ch, in_channels, 3, padding=1)

  def forward(self, z, t):
    half = self.channels // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    args = (t * self.time_scale)[:, None] * freqs[None]
    temb = self.time_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    h = self.stem(z)
    skips = [h]
    for m in self.down:
      h = m(h, temb) if isinstance(m, ResAttn) else m(h)
      skips.append(h)
    for m in self.mid:
      h = m(h, temb) if isinstance(m, FlowResBlock) else m(h)
    for m in self.up:
      h = m(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(m, ResAttn) else m(h)
    return self.out(F.silu(self.out_norm(h)))


def flax_tensor(a) -> torch.Tensor:
  """A writable float32 torch copy of a Flax (or NumPy) array."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  return torch.from_numpy(np.array(a, np.float32))  # a writable copy


def load_conv(m: nn.Module, p: dict) -> None:
  """Copies a channels-last Flax conv (kernel (*spatial, in, out), bias) into a torch ConvNd."""
  k = p["kernel"]
  m.weight.data.copy_(flax_tensor(k).permute(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2)))
  m.bias.data.copy_(flax_tensor(p["bias"]))


def load_affine(m: nn.Module, p: dict) -> None:
  """Copies a Flax norm's scale and bias into a torch norm's weight and bias."""
  m.weight.data.copy_(flax_tensor(p["scale"]))
  m.bias.data.copy_(flax_tensor(p["bias"]))


def load_flax_unet(model: FlowUNet3d, params: dict) -> FlowUNet3d:
  """Copies the parameters of a `latentfm.nn.unet3d.UNet3D` into `model` (same config).

  Flax numbers auto-named blocks in call order, which is this module's construction order.
  """
  conv, norm = load_conv, load_affine

  def dense(m, p):
    m.weight.data.copy_(flax_tensor(p["kernel"]).T)
    m.bias.data.copy_(flax_tensor(p["bias"]))

  dense(model.time_mlp[0], params["time_mlp_0"])
  dense(model.time_mlp[2], params["time_mlp_1"])
  conv(model.stem, params["stem"])
  res = [m for m in model.modules() if isinstance(m, FlowResBlock)]
  for i, m in enumerate(res):
    p = params[f"ResBlock_{i}"]
    norm(m.norm1, p["norm1"]), conv(m.conv1, p["conv1"]), dense(m.time_proj, p["time_proj"])
    norm(m.norm2, p["norm2"]), conv(m.conv2, p["conv2"])
    if "skip" in p:
      conv(m.skip, p["skip"])
  for i, m in enumerate(m for m in model.modules() if isinstance(m, FlowAttention)):
    p = params[f"AttentionBlock_{i}"]
    norm(m.norm, p["norm"]), dense(m.qkv, p["qkv"]), dense(m.proj, p["proj"])
  downs = [m for m in model.down if isinstance(m, nn.Conv3d)]
  for i, m in enumerate(downs):
    conv(m, params[f"Downsample_{i}"]["conv"])
  for i, m in enumerate(m for m in model.up if isinstance(m, nn.Sequential)):
    conv(m[1], params[f"Upsample_{i}"]["conv"])
  norm(model.out_norm, params["out_norm"])
  conv(model.out, params["out"])
  return model

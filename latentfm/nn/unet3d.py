"""3D UNet velocity field v(z, t) for latent flow matching.

True 3D convolutions on channels-last latents `(B, D, H, W, C)`. Levels are indexed from the
finest (0) to the coarsest (`len(channel_mults) - 1`); the spatial size halves between
consecutive levels, so every spatial axis must be divisible by `2 ** (levels - 1)`.

Layout (DDPM / guided-diffusion style): conv3 stem; per level `num_res_blocks` residual blocks
(each followed by self-attention at `attention_levels`) and a stride-2 conv downsample; a middle
block res-attn-res (attention only when the coarsest level is an attention level); a mirrored
decoder whose blocks take the concatenated skip connections (`num_res_blocks + 1` per level)
with nearest-neighbour upsampling + conv3; GroupNorm + SiLU + zero-initialised conv3 back to
the input channels.

Convolutions run through `latentfm.nn.layers.conv` in the implementation `conv_impl` names
("auto": the CPU formulation on the CPU, reverse mode only): `jax.jvp` through the network
needs `conv_impl="lax"`.
"""

from collections.abc import Sequence
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from latentfm.nn import group_norm, layers

Array = jax.Array


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Sinusoidal embedding `(B,) -> (B, dim)` ([cos | sin], geometric frequencies)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _norm(
  channels: int,
  max_groups: int,
  name: str | None = None,
  dtype: Any = jnp.float32,
  silu: bool = False,
  recompute: bool = False,
) -> group_norm.GroupNorm:
  """GroupNorm with the most groups (<= `max_groups`, dividing `channels`) of >= 4 channels,
  followed by SiLU if `silu`; `recompute`: see `group_norm.GroupNorm`.

  A group of one channel would subtract the per-channel time projection of a residual block
  entirely, leaving the network blind to t.
  """
  g = math.gcd(channels, max_groups)
  groups = max([d for d in range(1, g + 1) if g % d == 0 and channels // d >= 4], default=1)
  return layers.GroupNorm(channels, groups, name, dtype, silu, recompute)


def conv_init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
  """LeCun-normal conv kernel drawn as a 2D `(prod(k) * in, out)` matrix and reshaped.

  Same distribution as `nn.initializers.lecun_normal()` (fan_in = prod(k) * in), but XLA:CPU
  compiles a random draw of rank 5 far more slowly than one of rank 2.
  """
  flat = (math.prod(shape[:-1]), shape[-1])
  return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


def _conv(
  features: int,
  name: str | None = None,
  kernel: int = 3,
  strides: int = 1,
  kernel_init: nn.initializers.Initializer = conv_init,
  dtype: Any = jnp.float32,
  impl: str = "auto",
) -> layers.ZeroPadConv:
  """Zero-padded ("same" at stride 1) conv with `nn.Conv`'s parameters, through `layers.conv`
  in implementation `impl` (`layers.CONV_IMPLS`)."""
  return layers.ZeroPadConv(
    features,
    kernel,
    strides,
    kernel // 2,
    kernel_init,
    nn.initializers.zeros,
    dtype,
    impl,
    name=name,
  )


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3 -> + time projection -> GN -> SiLU -> dropout -> conv3, plus skip."""

  features: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32
  recompute_norms: bool = False  # GroupNorm + SiLU keep only their input for the backward pass
  conv_impl: str = "auto"  # see `latentfm.nn.layers`

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    light, impl = self.recompute_norms, self.conv_impl
    h = _norm(x.shape[-1], self.norm_groups, "norm1", self.dtype, silu=True, recompute=light)(x)
    h = _conv(self.features, "conv1", dtype=self.dtype, impl=impl)(h)
    h = (
      h
      + nn.Dense(self.features, name="time_proj", dtype=self.dtype)(nn.silu(temb))[
        :, None, None, None, :
      ]
    )
    h = _norm(self.features, self.norm_groups, "norm2", self.dtype, silu=True, recompute=light)(h)
    if train and self.dropout > 0.0:
      # Inverted dropout drawn flat: XLA:CPU compiles rank-5 random draws slowly.
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout, (h.size,))
      h = jnp.where(keep.reshape(h.shape), h / (1.0 - self.dropout), 0.0)
    h = _conv(self.features, "conv2", dtype=self.dtype, impl=impl)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, "skip", kernel=1, dtype=self.dtype, impl=impl)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all voxels (pre-GroupNorm, fused qkv, residual)."""

  num_heads: int = 4
  norm_groups: int = 32
  dtype: Any = jnp.float32
  recompute_norms: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, *spatial, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"{c} channels do not split into {self.num_heads} heads")
    h = _norm(c, self.norm_groups, "norm", self.dtype, recompute=self.recompute_norms)(x)
    h = h.reshape(b, -1, c)
    qkv = nn.Dense(3 * c, name="qkv", dtype=self.dtype)(h)
    qkv = qkv.reshape(b, h.shape[1], 3, self.num_heads, -1)
    h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    h = nn.Dense(c, name="proj", dtype=self.dtype)(h.reshape(b, -1, c))
    return x + h.reshape(b, *spatial, c)


class Downsample(nn.Module):
  """Stride-2 conv3 (padding 1): halves every spatial axis."""

  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _conv(x.shape[-1], "conv", strides=2, dtype=self.dtype, impl=self.conv_impl)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling followed by conv3."""

  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for axis in (1, 2, 3):
      x = jnp.repeat(x, 2, axis=axis)
    return _conv(x.shape[-1], "conv", dtype=self.dtype, impl=self.conv_impl)(x)


class UNet3D(nn.Module):
  """Velocity field `v(z, t[, label])`: `(B, D, H, W, C), (B,)[, (B,)] -> (B, D, H, W, C)`.

  With `num_classes > 0` the field is class-conditional: a learned embedding of the label is
  added to the time embedding. Label `num_classes` (also used when no label is given) is the
  learned null class that classifier-free guidance contrasts with.
  """

  channels: int = 64
  channel_mults: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = (1, 2)
  num_heads: int = 4
  dropout: float = 0.0
  time_embed_dim: int | None = None  # default: 4 * channels
  norm_groups: int = 32
  # t in [0, 1] is multiplied by this before the sinusoidal embedding, whose fastest frequency
  # is then `time_scale` rad per unit t: 1000 (DDPM-style) lets the field vary quickly in t,
  # which costs adaptive ODE solvers steps; smaller values give a smoother field.
  time_scale: float = 1000.0
  # Mixed precision and memory: computation dtype ("bfloat16" on accelerators; parameters and
  # optimizer state stay float32), rematerialisation of every residual block in backward, or
  # of the GroupNorm + SiLU intermediates only (`group_norm.py`).
  dtype: str = "float32"
  remat: bool = False
  recompute_norms: bool = False
  num_classes: int = 0  # 0: unconditional (no label parameters)
  conv_impl: str = "auto"  # the convolutions' implementation, see `latentfm.nn.layers`

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "UNet3D":
    """Builds the network from a flow config or its `model` section."""
    m = cfg.model if "model" in cfg else cfg
    return cls(
      channels=m.channels,
      channel_mults=tuple(m.channel_mults),
      num_res_blocks=m.num_res_blocks,
      attention_levels=tuple(m.attention_levels),
      num_heads=m.num_heads,
      dropout=m.dropout,
      time_embed_dim=m.time_embed_dim,
      norm_groups=m.norm_groups,
      time_scale=m.get("time_scale", 1000.0),
      dtype=m.get("dtype", "float32"),
      remat=m.get("remat", False),
      recompute_norms=m.get("recompute_norms", False),
      num_classes=m.get("num_classes", 0),
      conv_impl=m.get("conv_impl", "auto"),
    )

  @nn.compact
  def __call__(self, z: Array, t: Array, train: bool = False, label: Array | None = None) -> Array:
    """Args: z `(B, D, H, W, C)`; t scalar or `(B,)` in [0, 1]; label int `(B,)` in
    [0, num_classes] (num_classes = null class) or None (null class). Returns `(B, D, H, W, C)`."""
    levels = len(self.channel_mults)
    factor = 2 ** (levels - 1)
    if z.ndim != 5 or any(s % factor for s in z.shape[1:4]):
      raise ValueError(
        f"expected (B, D, H, W, C) with D, H, W divisible by {factor}, got {z.shape}"
      )
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z.shape[0],))
    tdim = self.time_embed_dim or 4 * self.channels
    temb = timestep_embedding(t * self.time_scale, self.channels)
    dtype = jnp.dtype(self.dtype)
    temb = nn.Dense(tdim, name="time_mlp_0", dtype=dtype)(temb)
    temb = nn.Dense(tdim, name="time_mlp_1", dtype=dtype)(nn.silu(temb))
    if self.num_classes > 0:
      null = jnp.full((z.shape[0],), self.num_classes, jnp.int32)
      label = null if label is None else jnp.asarray(label, jnp.int32).reshape(z.shape[0])
      # Unit-variance rows (PyTorch's nn.Embedding default, as in ADM) start the label at the
      # time embedding's scale: rows that start far smaller stay a small perturbation of it
      # through a short training run, and the field then hardly depends on the label.
      temb = temb + nn.Embed(
        self.num_classes + 1, tdim, name="label_embed", embedding_init=nn.initializers.normal(1.0)
      )(label).astype(dtype)
    elif label is not None:
      raise ValueError("this UNet3D is unconditional (num_classes = 0) but got labels")

    # Explicit names keep the parameter layout (checkpoints) the same with and without remat.
    block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    count = itertools.count()
    light, impl = self.recompute_norms, self.conv_impl
    res = lambda f: block(
      f, self.dropout, self.norm_groups, dtype, light, impl, name=f"ResBlock_{next(count)}"
    )
    attn = lambda: AttentionBlock(self.num_heads, self.norm_groups, dtype, light)
    attn_levels = set(self.attention_levels)

    h = _conv(self.channels, "stem", dtype=dtype, impl=impl)(z)
    skips = [h]
    for level, mult in enumerate(self.channel_mults):
      for _ in range(self.num_res_blocks):
        h = res(self.channels * mult)(h, temb, train)
        if level in attn_levels:
          h = attn()(h)
        skips.append(h)
      if level < levels - 1:
        h = Downsample(dtype, impl)(h)
        skips.append(h)

    h = res(h.shape[-1])(h, temb, train)
    if levels - 1 in attn_levels:
      h = attn()(h)
    h = res(h.shape[-1])(h, temb, train)

    for level in reversed(range(levels)):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.channels * self.channel_mults[level])(h, temb, train)
        if level in attn_levels:
          h = attn()(h)
      if level > 0:
        h = Upsample(dtype, impl)(h)

    h = _norm(h.shape[-1], self.norm_groups, "out_norm", dtype, silu=True, recompute=light)(h)
    out = _conv(z.shape[-1], "out", kernel_init=nn.initializers.zeros, dtype=dtype, impl=impl)(h)
    return out.astype(z.dtype)


def count_params(cfg: ml_collections.ConfigDict, in_channels: int = 8) -> int:
  """Trainable parameters of the UNet for `in_channels` latent channels (shapes only)."""
  model = UNet3D.from_config(cfg)
  size = 2 ** (len(model.channel_mults) - 1)
  z = jax.ShapeDtypeStruct((1, size, size, size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, t)
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"])))

"""3D VQ-GAN autoencoder (Khader et al. "Medical Diffusion" layout) and its parameter count.

Parameter tree of `VQGAN` (collection `"params"`):
  encoder/{conv_in, down_i, res_i, norm_out}
  decoder/{norm_in, up_i, res_i_0, res_i_1, conv_out}
  pre_vq_conv, post_vq_conv
Every conv holds `kernel` (*k, in, out) and `bias`; ResBlocks hold norm1, conv1, norm2, conv2.
The decoder's last layer (for the adaptive GAN weight) is `params["decoder"]["conv_out"]`.
The codebook lives in the `"codebook"` collection (see `quantizer.py`).
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from latentfm.nn.discriminators import PatchDiscriminator
from latentfm.nn.layers import GroupNorm, ResBlock, SamePadConv, SamePadConvTranspose
from latentfm.nn.quantizer import VectorQuantizer

Array = jax.Array


def to_model_range(images: Array) -> Array:
  """Images in [0, 1] → the autoencoder's [-1, 1], as (x - 0.5) * 2.

  The same numbers as x * 2 - 1 (float32: both are one rounding of 2x - 1), written so that
  XLA:CPU (jaxlib 0.10.2) does not fuse it as a multiply-add into the zero padding of a
  one-channel convolution input: that fused kernel loads four lanes unmasked and reads past
  the end of the image buffer, which crashed the VQ-GAN train step whenever the batch ended
  next to an unmapped page (`tests/test_guard_page.py`).
  """
  return (images - 0.5) * 2.0


def from_model_range(x: Array) -> Array:
  """The autoencoder's [-1, 1] → images in [0, 1], clipped."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def stage_strides(factors: Sequence[int]) -> list[tuple[int, ...]]:
  """Per-stage strides: 2 on an axis while it still needs halving, else 1."""
  remaining = [int(round(math.log2(f))) for f in factors]
  if any(2**r != f for r, f in zip(remaining, factors)):
    raise ValueError(f"down/upsampling factors must be powers of two, got {tuple(factors)}")
  strides = []
  for _ in range(max(remaining)):
    strides.append(tuple(2 if r > 0 else 1 for r in remaining))
    remaining = [r - 1 for r in remaining]
  return strides


def _res_block(remat: bool) -> type[nn.Module]:
  """ResBlock, recomputed in the backward pass when `remat` (same parameter names)."""
  return nn.remat(ResBlock) if remat else ResBlock


class Encoder(nn.Module):
  """conv3 -> [strided conv4 -> ResBlock] per stage -> GN -> SiLU."""

  n_hiddens: int
  downsample: Sequence[int]
  norm_groups: int = 32
  dtype: Any = None  # computation dtype; parameters stay float32
  remat: bool = False
  recompute_norms: bool = False
  conv_impl: str = "auto"  # see `latentfm.nn.layers`

  @nn.compact
  def __call__(self, x: Array) -> Array:
    block, impl = _res_block(self.remat), self.conv_impl
    h = SamePadConv(self.n_hiddens, 3, 1, self.dtype, impl, name="conv_in")(x)
    for i, s in enumerate(stage_strides(self.downsample)):
      h = SamePadConv(self.n_hiddens * 2 ** (i + 1), 4, s, self.dtype, impl, name=f"down_{i}")(h)
      h = block(self.norm_groups, self.dtype, self.recompute_norms, impl, name=f"res_{i}")(h)
    return GroupNorm(
      h.shape[-1],
      self.norm_groups,
      "norm_out",
      self.dtype,
      silu=True,
      recompute=self.recompute_norms,
    )(h)


UPSAMPLERS = ("transposed", "resize")


def nearest_upsample(x: Array, strides: Sequence[int]) -> Array:
  """Repeats every voxel of (B, *spatial, C) `strides[i]` times along spatial axis i."""
  for axis, s in enumerate(strides):
    if s > 1:
      x = jnp.repeat(x, s, axis=axis + 1)
  return x


class Decoder(nn.Module):
  """GN -> SiLU -> [upsampling -> 2 ResBlocks] per stage -> conv3 to image channels.

  `upsampler` "transposed" is the reference's transposed conv k4 s2. "resize" (nearest
  upsampling, then a conv k3) gives every output voxel the same number of kernel taps, so it
  avoids the stride-period checkerboard that uneven tap overlap gives a transposed conv.
  """

  n_hiddens: int
  upsample: Sequence[int]
  image_channels: int = 1
  norm_groups: int = 32
  dtype: Any = None  # computation dtype; parameters stay float32
  remat: bool = False
  recompute_norms: bool = False
  upsampler: str = "transposed"
  conv_impl: str = "auto"  # see `latentfm.nn.layers`

  @nn.compact
  def __call__(self, x: Array) -> Array:
    block, impl = _res_block(self.remat), self.conv_impl
    h = GroupNorm(
      x.shape[-1],
      self.norm_groups,
      "norm_in",
      self.dtype,
      silu=True,
      recompute=self.recompute_norms,
    )(x)
    strides = stage_strides(self.upsample)
    for i, s in enumerate(strides):
      features = self.n_hiddens * 2 ** (len(strides) - i)
      if self.upsampler == "resize":
        h = SamePadConv(features, 3, 1, self.dtype, impl, name=f"up_{i}")(nearest_upsample(h, s))
      else:
        h = SamePadConvTranspose(features, 4, s, self.dtype, impl, name=f"up_{i}")(h)
      h = block(self.norm_groups, self.dtype, self.recompute_norms, impl, name=f"res_{i}_0")(h)
      h = block(self.norm_groups, self.dtype, self.recompute_norms, impl, name=f"res_{i}_1")(h)
    return SamePadConv(self.image_channels, 3, 1, self.dtype, impl, name="conv_out")(h)


class VQGAN(nn.Module):
  """Encoder -> 1x1x1 conv -> vector quantiser -> 1x1x1 conv -> decoder.

  Inputs are (B, D, H, W, image_channels) in [-1, 1]; latents are (B, D/f, H/f, W/f, embedding_dim).
  `dtype` "bfloat16" computes the encoder and decoder in bfloat16 (parameters, the quantiser, the
  latents and the reconstruction stay float32); `remat` recomputes every residual block in the
  backward pass instead of storing its activations; `recompute_norms` only the GroupNorm + SiLU
  intermediates (`group_norm.py`); `conv_impl` picks the convolutions' implementation
  (`latentfm.nn.layers`). None changes the parameter layout.
  """

  image_channels: int = 1
  n_hiddens: int = 16
  downsample: Sequence[int] = (4, 4, 4)
  embedding_dim: int = 8
  n_codes: int = 12288
  norm_groups: int = 32
  codebook_decay: float = 0.99
  restart_dead_codes: bool = True
  dtype: str = "float32"
  remat: bool = False
  recompute_norms: bool = False
  upsampler: str = "transposed"
  conv_impl: str = "auto"

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "VQGAN":
    """Builds the autoencoder from a config's `model` section."""
    return cls(
      image_channels=model.image_channels,
      n_hiddens=model.n_hiddens,
      downsample=tuple(model.downsample),
      embedding_dim=model.embedding_dim,
      n_codes=model.n_codes,
      norm_groups=model.norm_groups,
      codebook_decay=model.codebook_decay,
      restart_dead_codes=model.restart_dead_codes,
      dtype=model.get("dtype", "float32"),
      remat=model.get("remat", False),
      recompute_norms=model.get("recompute_norms", False),
      upsampler=model.get("upsampler", "transposed"),
      conv_impl=model.get("conv_impl", "auto"),
    )

  def setup(self):
    stages = len(stage_strides(self.downsample))
    dtype = jnp.dtype(self.dtype)
    impl = self.conv_impl
    self.encoder = Encoder(
      self.n_hiddens,
      tuple(self.downsample),
      self.norm_groups,
      dtype,
      self.remat,
      self.recompute_norms,
      impl,
    )
    if self.upsampler not in UPSAMPLERS:
      raise ValueError(f"model.upsampler must be one of {UPSAMPLERS}, got {self.upsampler!r}")
    self.decoder = Decoder(
      self.n_hiddens,
      tuple(self.downsample),
      self.image_channels,
      self.norm_groups,
      dtype,
      self.remat,
      self.recompute_norms,
      self.upsampler,
      impl,
    )
    self.pre_vq_conv = SamePadConv(self.embedding_dim, 1, 1, dtype, impl)
    self.post_vq_conv = SamePadConv(self.n_hiddens * 2**stages, 1, 1, dtype, impl)
    self.quantizer = VectorQuantizer(
      self.n_codes, self.embedding_dim, self.codebook_decay, self.restart_dead_codes
    )

  def encode(self, x: Array) -> Array:
    """Continuous latent after the pre-VQ conv (before quantisation)."""
    return self.pre_vq_conv(self.encoder(x)).astype(jnp.float32)

  def quantize(self, z: Array, train: bool = False) -> dict[str, Array]:
    """Quantiser output dict for a latent `z` (see `VectorQuantizer.__call__`)."""
    return self.quantizer(z, train=train)

  def decode(self, z: Array) -> Array:
    """Image from a (quantised or continuous) latent with `embedding_dim` channels."""
    return self.decoder(self.post_vq_conv(z)).astype(jnp.float32)

  def lookup(self, indices: Array) -> Array:
    """Latent of code vectors for integer code indices (B, d, h, w)."""
    return self.quantizer.lookup(indices)

  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    """Full autoencoding pass.

    Returns `recon`, `latent` (continuous z), `quantized` (straight-through), `indices`,
    `commitment_loss`, `perplexity`, `live_codes`.
    """
    z = self.encode(x)
    q = self.quantize(z, train=train)
    return {"recon": self.decode(q["quantized"]), "latent": z, **q}


def _count(tree) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _lpips_count() -> int:
  """Parameters of the frozen LPIPS network (VGG16 features + linear heads)."""
  from latentfm.nn.lpips import LPIPS  # pylint: disable=import-outside-toplevel

  img = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), img, img)
  return _count(shapes.get("params", shapes))


def parameter_breakdown(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Trainable parameter counts per part (LPIPS: frozen, counted for reference).

  `config` is a VQ-GAN config or its `model` section. Shapes only; nothing is allocated.
  """
  config = config.model if "model" in config else config
  key = jax.random.key(0)
  c = config.image_channels
  vol = jax.ShapeDtypeStruct((1, 16, 16, 16, c), jnp.float32)
  img = jax.ShapeDtypeStruct((1, 16, 16, c), jnp.float32)
  p = jax.eval_shape(VQGAN.from_config(config).init, key, vol)["params"]

  def disc(dims, x):
    d = PatchDiscriminator(config.disc_channels, config.disc_layers, spatial_dims=dims)
    return _count(jax.eval_shape(d.init, key, x)["params"])

  return {
    "encoder": _count(p["encoder"]),
    "decoder": _count(p["decoder"]),
    "pre_vq_conv": _count(p["pre_vq_conv"]),
    "post_vq_conv": _count(p["post_vq_conv"]),
    "codebook": _count(p.get("quantizer", {})),
    "image_discriminator": disc(2, img),
    "volume_discriminator": disc(3, vol),
    "lpips": _lpips_count(),
  }

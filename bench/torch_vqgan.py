"""The full VQ-GAN train step of `latentfm.train.vqgan_step` in PyTorch (benchmarks).

`VQGANTrainStep(config)` builds, from a VQ-GAN config (`experiments.configs.vqgan`), the thesis
autoencoder of `bench.torch_models` with an EMA vector quantiser (`latentfm.nn.quantizer`), the
2D slice and 3D volume patch discriminators (`latentfm.nn.discriminators`) and a frozen VGG
LPIPS from the `lpips` package. Each call does what `make_train_step(config, use_gan=True)` does
with `optim.accumulate = 1` past `discriminator_start`: the generator loss of
`losses.vqgan_generator_loss`, an Adam step after global-norm clipping, then the discriminator
loss on real and detached fake inputs and its Adam step. Tensors are channels-first.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator
import warnings

import ml_collections
import torch
from torch import nn
import torch.nn.functional as F

from bench.torch_models import ThesisAutoencoder, flax_tensor, load_affine, load_conv


class VectorQuantizer(nn.Module):
  """Nearest-code quantiser of the channel axis with an EMA codebook and dead-code restarts."""

  def __init__(
    self,
    n_codes: int,
    dim: int,
    decay: float = 0.99,
    restart_dead_codes: bool = True,
    eps: float = 1e-5,
  ):
    super().__init__()
    self.n_codes, self.dim, self.decay, self.eps = n_codes, dim, decay, eps
    self.restart_dead_codes = restart_dead_codes
    self.register_buffer("embeddings", torch.randn(n_codes, dim))
    self.register_buffer("cluster_size", torch.zeros(n_codes))
    self.register_buffer("embed_sum", self.embeddings.clone())
    self.register_buffer("initialized", torch.tensor(False))

  def _sample(self, flat: torch.Tensor) -> torch.Tensor:
    """`n_codes` random rows of `flat`, tiled and jittered when there are fewer rows."""
    m, k = flat.shape[0], self.n_codes
    if m >= k:
      return flat[torch.randperm(m, device=flat.device)[:k]]
    idx = torch.randperm(m * -(-k // m), device=flat.device)[:k] % m
    jitter = torch.randn(k, self.dim, device=flat.device)
    return flat[idx] + jitter * (0.01 / math.sqrt(self.dim))

  def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(straight-through quantised z, commitment loss, perplexity) of z (B, dim, ...).

    The codebook search and its EMA update run in float32, also under autocast.
    """
    flat = z.detach().float().movedim(1, -1).reshape(-1, self.dim)
    update = self.training
    with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
      if update and not bool(self.initialized):
        fresh = self._sample(flat)
        self.embeddings.copy_(fresh)
        self.embed_sum.copy_(fresh)
        self.cluster_size.fill_(1.0)
      emb = self.embeddings.clone()
      dist = (flat**2).sum(1, keepdim=True) - 2.0 * flat @ emb.T + (emb**2).sum(1)[None, :]
      idx = dist.argmin(1)
      counts = torch.bincount(idx, minlength=self.n_codes).float()
      if update:
        sums = torch.zeros_like(emb).index_add_(0, idx, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n
        self.embeddings.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_dead_codes:
          fresh, dead = self._sample(flat), self.cluster_size < 1.0
          self.embeddings[dead] = fresh[dead]
          self.embed_sum[dead] = fresh[dead]
          self.cluster_size[dead] = 1.0
        self.initialized.fill_(True)
      codes = emb[idx].reshape(z.shape[0], *z.shape[2:], self.dim).movedim(-1, 1)
      probs = counts / flat.shape[0]
      perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    quantized = z + (codes - z).detach()
    return quantized, F.mse_loss(z, codes), perplexity


class PatchDiscriminator(nn.Module):
  """pix2pixHD `NLayerDiscriminator` as `latentfm.nn.discriminators.PatchDiscriminator`."""

  def __init__(
    self, channels: int = 64, num_layers: int = 3, spatial_dims: int = 3, in_channels: int = 1
  ):
    super().__init__()
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
    self.blocks = nn.ModuleList(
      [nn.Sequential(conv(in_channels, channels, 4, 2, 2), nn.LeakyReLU(0.2))]
    )
    cin = channels
    for n in range(1, num_layers + 1):
      cout = min(channels * 2**n, 512)
      self.blocks.append(
        nn.Sequential(
          conv(cin, cout, 4, 2 if n < num_layers else 1, 2),
          norm(cout, eps=1e-5, momentum=0.1),
          nn.LeakyReLU(0.2),
        )
      )
      cin = cout
    self.out = conv(cin, 1, 4, 1, 2)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the num_layers + 1 block outputs)."""
    features = []
    for block in self.blocks:
      x = block(x)
      features.append(x)
    return self.out(x), features


def load_flax_discriminator(
  model: PatchDiscriminator, params: dict, batch_stats: dict | None = None
) -> PatchDiscriminator:
  """Copies a JAX `PatchDiscriminator`'s params (and running statistics) into `model`."""
  for n, block in enumerate(model.blocks):
    load_conv(block[0], params[f"conv_{n}"])
    if n:
      load_affine(block[1], params[f"norm_{n}"])
      if batch_stats is not None:
        block[1].running_mean.copy_(flax_tensor(batch_stats[f"norm_{n}"]["mean"]))
        block[1].running_var.copy_(flax_tensor(batch_stats[f"norm_{n}"]["var"]))
  load_conv(model.out, params["conv_out"])
  return model


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
  """Generator loss on fake logits: hinge -mean, or vanilla (non-saturating) softplus."""
  return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
  """Discriminator loss on real and fake logits, as `latentfm.losses.d_loss`."""
  if kind == "hinge":
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
  return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
  """pix2pixHD feature matching: sum of 4/n * mean|fake_i - detached real_i|."""
  return sum(4.0 / len(fake) * (f - r.detach()).abs().mean() for f, r in zip(fake, real))


@contextlib.contextmanager
def running_stats_frozen(*modules: nn.Module) -> Iterator[None]:
  """Batch statistics still normalise, but running statistics are left as they are."""
  norms = [
    m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
  ]  # pylint: disable=protected-access
  saved = [m.momentum for m in norms]
  for m in norms:
    m.momentum = 0.0
  try:
    yield
  finally:
    for m, momentum in zip(norms, saved):
      m.momentum = momentum


class VQGANTrainStep(nn.Module):
  """`step(images)` with images (B, 1, D, H, W) in [0, 1]; returns detached loss terms.

  The GAN terms always count fully (factor 1, as past `discriminator_start`).
  """

  def __init__(self, config: ml_collections.ConfigDict) -> None:
    super().__init__()
    model, self.loss_cfg = config.model, config.loss
    if tuple(model.downsample) != (4, 4, 4) or model.image_channels != 1:
      raise ValueError("the PyTorch reference has the thesis layout: downsample 4, 1 channel")
    if self.loss_cfg.adaptive_weight or config.optim.accumulate != 1:
      raise NotImplementedError("adaptive GAN weight and gradient accumulation")
    if self.loss_cfg.gan_loss not in ("hinge", "vanilla"):
      raise ValueError(f"unknown GAN loss {self.loss_cfg.gan_loss!r}")
    self.ae = ThesisAutoencoder(model.n_hiddens, model.embedding_dim)
    self.quantizer = VectorQuantizer(
      model.n_codes, model.embedding_dim, model.codebook_decay, model.restart_dead_codes
    )
    self.image_disc = PatchDiscriminator(model.disc_channels, model.disc_layers, 2)
    self.volume_disc = PatchDiscriminator(model.disc_channels, model.disc_layers, 3)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      import lpips  # pylint: disable=import-outside-toplevel

      self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    self.lpips.eval().requires_grad_(False)
    o = config.optim
    adam = lambda ps: torch.optim.Adam(ps, lr=o.lr, betas=(o.b1, o.b2), eps=1e-8)
    self.clip = o.grad_clip
    self.g_params = list(self.ae.parameters())
    self.d_params = list(self.image_disc.parameters()) + list(self.volume_disc.parameters())
    self.g_opt, self.d_opt = adam(self.g_params), adam(self.d_params)

  def train(self, mode: bool = True) -> "VQGANTrainStep":
    """Train mode for all but LPIPS, which stays in eval mode (no dropout)."""
    super().train(mode)
    self.lpips.eval()
    return self

  def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """One generator and one discriminator update."""
    cfg, kind = self.loss_cfg, self.loss_cfg.gan_loss
    x = (images - 0.5) * 2.0
    discs = (self.image_disc, self.volume_disc)
    for disc in discs:
      disc.requires_grad_(False)
    z = self.ae.pre_vq(self.ae.encoder(x))
    q, commitment, perplexity = self.quantizer(z)
    recon = self.ae.decoder(self.ae.post_vq(q))
    rows = torch.arange(x.shape[0], device=x.device)
    idx = torch.randint(0, x.shape[2], (x.shape[0],), device=x.device)
    xs, rs = x[rows, :, idx], recon[rows, :, idx]  # one depth slice per volume: (B, 1, H, W)
    perceptual = self.lpips(xs.expand(-1, 3, -1, -1), rs.expand(-1, 3, -1, -1)).mean()
    with running_stats_frozen(*discs):
      fake_img, fake_img_feats = self.image_disc(rs)
      fake_vol, fake_vol_feats = self.volume_disc(recon)
      with torch.no_grad():
        real_img_feats = self.image_disc(xs)[1]
        real_vol_feats = self.volume_disc(x)[1]
    terms = {
      "l1": (x - recon).abs().mean(),
      "commitment": commitment,
      "perceptual": perceptual,
      "g_image": g_loss(kind, fake_img),
      "g_volume": g_loss(kind, fake_vol),
      "feature_matching": (
        feature_matching(fake_img_feats, real_img_feats)
        + feature_matching(fake_vol_feats, real_vol_feats)
      ),
    }
    loss = (
      cfg.l1_weight * terms["l1"]
      + cfg.commitment_weight * commitment
      + cfg.perceptual_weight * perceptual
      + cfg.image_gan_weight * terms["g_image"]
      + cfg.volume_gan_weight * terms["g_volume"]
      + cfg.gan_feat_weight * terms["feature_matching"]
    )
    self.g_opt.zero_grad(set_to_none=True)
    loss.backward()
    g_norm = nn.utils.clip_grad_norm_(self.g_params, self.clip)
    self.g_opt.step()

    for disc in discs:
      disc.requires_grad_(True)
    fake_slices, fake_volumes = rs.detach(), recon.detach()
    d_image = d_loss(kind, self.image_disc(xs)[0], self.image_disc(fake_slices)[0])
    d_volume = d_loss(kind, self.volume_disc(x)[0], self.volume_disc(fake_volumes)[0])
    d = cfg.image_gan_weight * d_image + cfg.volume_gan_weight * d_volume
    self.d_opt.zero_grad(set_to_none=True)
    d.backward()
    d_norm = nn.utils.clip_grad_norm_(self.d_params, self.clip)
    self.d_opt.step()
    terms.update(
      loss=loss,
      perplexity=perplexity,
      g_grad_norm=g_norm,
      d_image=d_image,
      d_volume=d_volume,
      d_loss=d,
      d_grad_norm=d_norm,
    )
    return {k: v.detach() for k, v in terms.items()}

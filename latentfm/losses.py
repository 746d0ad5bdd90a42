"""VQ-GAN losses: L1, slice LPIPS, GAN (hinge / vanilla), feature matching, adaptive weight.

All functions are pure and jittable; only `kind` strings and config fields are static.

Adaptive GAN weight (thesis eq. 3.9), λ = ‖∇_G L_rec‖ / (‖∇_G L_GAN‖ + 1e-6), with both
gradients taken w.r.t. the decoder's last-layer kernel `params["decoder"]["conv_out"]["kernel"]`.
Inside the generator loss function (differentiated w.r.t. `params` by the train step):

  kernel = last_layer(params)

  def forward(k):  # kernel -> (recon, aux); the one VQ-GAN forward pass of the step
    out, upd = model.apply({"params": replace_last_layer(params, k), **state}, x,
                           train=True, mutable=["codebook"], rngs=rngs)
    return out["recon"], (out, upd)

  def rec_loss(recon):  # weighted reconstruction part
    return (cfg.l1_weight * l1_loss(x, recon)
            + cfg.perceptual_weight * perceptual_loss(lpips_apply, key, x, recon))

  def gan_loss(recon):  # weighted adversarial part
    _, fake_slices = random_slices(key, x, recon)
    fi, _ = image_disc.apply(image_vars, fake_slices)
    fv, _ = volume_disc.apply(volume_vars, recon)
    return cfg.image_gan_weight * g_loss(kind, fi) + cfg.volume_gan_weight * g_loss(kind, fv)

  recon, (out, upd), rec_grad, gan_grad = last_layer_grads(forward, kernel, rec_loss, gan_loss)
  lam = adaptive_weight(rec_grad, gan_grad)  # already stop-gradient

The forward pass runs once: `last_layer_grads` pulls dL/d(recon) back through the last conv
only, and the outer gradient w.r.t. `params` still flows into the kernel through `forward`.
The plain (slower) equivalent is `jax.grad(lambda k: rec_loss(forward(k)[0]))(kernel)`.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
DiscOutput = tuple[Array, Sequence[Array]]  # (logits, intermediate features)

LAST_LAYER = ("decoder", "conv_out", "kernel")
GAN_KINDS = ("hinge", "vanilla")


# ----------------------------------------------------------------------------- reconstruction


def l1_loss(x: Array, y: Array) -> Array:
  """Mean absolute error."""
  return jnp.mean(jnp.abs(x - y))


def random_slices(key: Array, x: Array, y: Array) -> tuple[Array, Array]:
  """One random depth slice per volume, the same index for `x` and `y`.

  (B, D, H, W, C) volumes -> (B, H, W, C) images; index b is drawn uniformly in [0, D).
  """
  if x.shape != y.shape or x.ndim != 5:
    raise ValueError(f"expected two (B, D, H, W, C) volumes, got {x.shape} and {y.shape}")
  b, d = x.shape[:2]
  idx = jax.random.randint(key, (b,), 0, d)
  rows = jnp.arange(b)
  return x[rows, idx], y[rows, idx]


def perceptual_loss(
  lpips_apply: Callable[[Array, Array], Array], key: Array, x: Array, y: Array
) -> Array:
  """Mean LPIPS over one random depth slice per volume (see `random_slices`).

  `lpips_apply(xs, ys) -> (B,)` takes NHWC images in [-1, 1], e.g. `nn.lpips.lpips_fn()`.
  Reuse `key` to hand the image discriminator the same slices.
  """
  xs, ys = random_slices(key, x, y)
  return jnp.mean(lpips_apply(xs, ys))


# ----------------------------------------------------------------------------- adversarial


def hinge_d_loss(real_logits: Array, fake_logits: Array) -> Array:
  """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def vanilla_d_loss(real_logits: Array, fake_logits: Array) -> Array:
  """0.5 * (mean softplus(-real) + mean softplus(fake)): binary cross-entropy on logits."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits)))


def hinge_g_loss(fake_logits: Array) -> Array:
  """-mean(fake)."""
  return -jnp.mean(fake_logits)


def vanilla_g_loss(fake_logits: Array) -> Array:
  """mean softplus(-fake): non-saturating generator loss."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def _check_kind(kind: str) -> None:
  if kind not in GAN_KINDS:
    raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_KINDS}")


def d_loss(kind: str, real_logits: Array, fake_logits: Array) -> Array:
  """Discriminator loss of the given kind ("hinge" or "vanilla")."""
  _check_kind(kind)
  fn = hinge_d_loss if kind == "hinge" else vanilla_d_loss
  return fn(real_logits, fake_logits)


def g_loss(kind: str, fake_logits: Array) -> Array:
  """Generator loss of the given kind ("hinge" or "vanilla")."""
  _check_kind(kind)
  fn = hinge_g_loss if kind == "hinge" else vanilla_g_loss
  return fn(fake_logits)


def feature_matching_loss(fake_features: Sequence[Array], real_features: Sequence[Array]) -> Array:
  """pix2pixHD feature matching: sum_i 4/n * mean|fake_i - sg(real_i)| over n feature maps."""
  if len(fake_features) != len(real_features) or not fake_features:
    raise ValueError(
      f"need equally many (>0) feature maps, got {len(fake_features)} and {len(real_features)}"
    )
  w = 4.0 / len(fake_features)
  return sum(w * l1_loss(f, jax.lax.stop_gradient(r)) for f, r in zip(fake_features, real_features))


def gan_factor(step: Array | int, start: Array | int) -> Array:
  """1.0 once `step >= start` (the discriminator start), else 0.0; works on traced steps."""
  return jnp.where(jnp.asarray(step) >= start, 1.0, 0.0).astype(jnp.float32)


# ----------------------------------------------------------------------------- adaptive weight


def last_layer(params: Mapping[str, Any], path: Sequence[str] = LAST_LAYER) -> Array:
  """The decoder's last-layer kernel (or the leaf at `path`)."""
  for name in path:
    params = params[name]
  return params


def replace_last_layer(
  params: Mapping[str, Any], kernel: Array, path: Sequence[str] = LAST_LAYER
) -> dict[str, Any]:
  """A copy of `params` with the leaf at `path` replaced (only the dicts on the path are copied)."""
  if not path:
    return kernel
  head, *rest = path
  out = dict(params)
  out[head] = replace_last_layer(params[head], kernel, rest)
  return out


def last_layer_grads(
  forward: Callable[[Array], tuple[Array, Any]],
  kernel: Array,
  rec_loss_fn: Callable[[Array], Array],
  gan_loss_fn: Callable[[Array], Array],
) -> tuple[Array, Any, Array, Array]:
  """Gradients of two losses of the reconstruction w.r.t. the last-layer kernel.

  Args:
    forward: `kernel -> (recon, aux)`, the model forward pass with that kernel substituted.
    kernel: the current last-layer kernel (`last_layer(params)`).
    rec_loss_fn: `recon -> scalar` reconstruction loss.
    gan_loss_fn: `recon -> scalar` adversarial generator loss.

  Returns:
    `(recon, aux, rec_grad, gan_grad)`; `recon` and `aux` stay differentiable w.r.t. anything
    `forward` closes over (and `kernel`), so the caller builds its loss from them.
  """
  recon, pullback, aux = jax.vjp(forward, kernel, has_aux=True)
  (rec_grad,) = pullback(jax.grad(rec_loss_fn)(recon))
  (gan_grad,) = pullback(jax.grad(gan_loss_fn)(recon))
  return recon, aux, rec_grad, gan_grad


def _norm(tree: Any) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)))


def adaptive_weight(rec_grad: Any, gan_grad: Any, max_weight: float = 1e4) -> Array:
  """λ = ‖rec_grad‖ / (‖gan_grad‖ + 1e-6), clipped to [0, max_weight], stop-gradient."""
  lam = _norm(rec_grad) / (_norm(gan_grad) + 1e-6)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, max_weight))


# ----------------------------------------------------------------------------- assembled


def vqgan_generator_loss(
  x: Array,
  recon: Array,
  commitment: Array,
  perceptual: Array,
  fake_image: DiscOutput,
  real_image: DiscOutput,
  fake_volume: DiscOutput,
  real_volume: DiscOutput,
  config: ml_collections.ConfigDict,
  step: Array | int,
  adaptive: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Generator (autoencoder) objective.

  Args:
    x, recon: input and reconstructed volumes (B, D, H, W, C).
    commitment: the quantiser's commitment loss; perceptual: `perceptual_loss(...)`.
    fake_image, real_image: image discriminator `(logits, features)` on the slices of recon / x.
    fake_volume, real_volume: volume discriminator `(logits, features)` on recon / x.
      Only the features of the real inputs are used (and not differentiated).
    config: the `loss` section of a VQ-GAN config.
    step: the training step (may be traced).
    adaptive: λ from `adaptive_weight`; required when `config.adaptive_weight`, else ignored
      (λ = 1).

  Returns:
    `(loss, terms)` with terms l1, commitment, perceptual, g_image, g_volume, feature_matching,
    gan_weight (λ·factor) and loss.
  """
  if config.adaptive_weight and adaptive is None:
    raise ValueError("config.adaptive_weight is set: pass `adaptive` (see adaptive_weight)")
  lam = jax.lax.stop_gradient(adaptive) if config.adaptive_weight else 1.0
  factor = gan_factor(step, config.discriminator_start)
  terms = {
    "l1": l1_loss(x, recon),
    "commitment": jnp.asarray(commitment, jnp.float32),
    "perceptual": jnp.asarray(perceptual, jnp.float32),
    "g_image": g_loss(config.gan_loss, fake_image[0]),
    "g_volume": g_loss(config.gan_loss, fake_volume[0]),
  }
  terms["feature_matching"] = feature_matching_loss(
    fake_image[1], real_image[1]
  ) + feature_matching_loss(fake_volume[1], real_volume[1])
  terms["gan_weight"] = factor * lam
  gan = config.image_gan_weight * terms["g_image"] + config.volume_gan_weight * terms["g_volume"]
  terms["loss"] = (
    config.l1_weight * terms["l1"]
    + config.commitment_weight * terms["commitment"]
    + config.perceptual_weight * terms["perceptual"]
    + terms["gan_weight"] * gan
    + factor * config.gan_feat_weight * terms["feature_matching"]
  )
  return terms["loss"], terms


def vqgan_discriminator_loss(
  real_image_logits: Array,
  fake_image_logits: Array,
  real_volume_logits: Array,
  fake_volume_logits: Array,
  config: ml_collections.ConfigDict,
  step: Array | int,
) -> tuple[Array, dict[str, Array]]:
  """Discriminator objective on real / fake (detached recon) logits of both discriminators.

  Returns `(loss, terms)` with terms d_image, d_volume, d_loss and the mean logits
  real_image_logit, fake_image_logit, real_volume_logit, fake_volume_logit.
  """
  factor = gan_factor(step, config.discriminator_start)
  terms = {
    "d_image": d_loss(config.gan_loss, real_image_logits, fake_image_logits),
    "d_volume": d_loss(config.gan_loss, real_volume_logits, fake_volume_logits),
    "real_image_logit": jnp.mean(real_image_logits),
    "fake_image_logit": jnp.mean(fake_image_logits),
    "real_volume_logit": jnp.mean(real_volume_logits),
    "fake_volume_logit": jnp.mean(fake_volume_logits),
  }
  terms["d_loss"] = factor * (
    config.image_gan_weight * terms["d_image"] + config.volume_gan_weight * terms["d_volume"]
  )
  return terms["d_loss"], terms

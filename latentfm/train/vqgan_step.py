"""VQ-GAN train state, optimizers and the pure jitted train/eval steps (built by factories).

The train state is a plain dict (Orbax-friendly) holding everything a resume needs:
`step`, `params` (autoencoder), `codebook` (EMA state + init flag), `disc_params` and
`disc_stats` ({"image", "volume"}), `g_opt`, `d_opt` and the root `rng`.
Volumes enter the steps in [0, 1] as (B, D, H, W, 1) and are fed to the networks in [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from latentfm import losses
from latentfm.metrics import image as image_metrics
from latentfm.nn.discriminators import make_discriminators
from latentfm.nn.lpips import LPIPS
from latentfm.nn.vqgan import VQGAN, from_model_range, to_model_range
from latentfm.train import compiler, schedules

State = dict[str, Any]


def make_optimizer(
  optim: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
  """Adam(b1, b2) after global-norm clipping, with optional gradient accumulation.

  The learning rate follows `schedules.learning_rate` over `num_steps` train steps.
  """
  lr = schedules.learning_rate(optim, max(num_steps, 1) // max(optim.accumulate, 1))
  tx = optax.chain(
    optax.clip_by_global_norm(optim.grad_clip), optax.adam(lr, b1=optim.b1, b2=optim.b2)
  )
  if optim.accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulate)
  return tx


def optimizers(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(autoencoder, discriminator) optimizers; the discriminators' run starts at their start."""
  steps = config.train.num_steps
  return (
    make_optimizer(config.optim, steps),
    make_optimizer(config.optim, steps - min(config.loss.discriminator_start, steps)),
  )


def models(config: ml_collections.ConfigDict):
  """(autoencoder, 2D slice discriminator, 3D volume discriminator) of a config."""
  return (VQGAN.from_config(config.model),) + make_discriminators(config.model)


def create_state(key: jax.Array, config: ml_collections.ConfigDict) -> State:
  """A freshly initialised train state (the codebook is initialised by the first train batch)."""
  model, image_disc, volume_disc = models(config)
  shape = (1,) + tuple(config.data.shape) + (config.model.image_channels,)
  k_model, k_img, k_vol, k_rng = jax.random.split(key, 4)
  x = jnp.zeros(shape, jnp.float32)
  variables = compiler.jit(model.init)(k_model, x)
  img_vars = compiler.jit(image_disc.init)(k_img, x[:, 0])
  vol_vars = compiler.jit(volume_disc.init)(k_vol, x)
  g_tx, d_tx = optimizers(config)
  disc_params = {"image": img_vars["params"], "volume": vol_vars["params"]}
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": variables["params"],
    "codebook": variables["codebook"],
    "disc_params": disc_params,
    "disc_stats": {"image": img_vars["batch_stats"], "volume": vol_vars["batch_stats"]},
    "g_opt": g_tx.init(variables["params"]),
    "d_opt": d_tx.init(disc_params),
    "rng": k_rng,
  }


def make_train_step(
  config: ml_collections.ConfigDict, *, use_gan: bool
) -> Callable[[State, dict, Any], tuple[State, dict]]:
  """Pure `step(state, batch, lpips_params) -> (state, metrics)`.

  `use_gan=False` is the warm-up before `discriminator_start` (no discriminator work at all);
  `use_gan=True` adds both discriminators, feature matching and the discriminator update.
  """
  model, image_disc, volume_disc = models(config)
  cfg = config.loss
  g_tx, d_tx = optimizers(config)
  lpips_model = LPIPS(config.model.get("conv_impl", "auto"))

  def disc(module, params, stats, x):
    (logits, feats), upd = module.apply(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    return (logits, feats), upd["batch_stats"]

  def step(state: State, batch: dict, lpips_params: Any) -> tuple[State, dict]:
    x = to_model_range(batch["image"])
    key = jax.random.fold_in(state["rng"], state["step"])
    k_code, k_slice = jax.random.split(key)
    dp, ds = state["disc_params"], state["disc_stats"]
    lpips_apply = lambda a, b: lpips_model.apply(lpips_params, a, b)

    def g_loss_fn(params):
      def forward(kernel):
        p = losses.replace_last_layer(params, kernel)
        out, upd = model.apply(
          {"params": p, "codebook": state["codebook"]},
          x,
          train=True,
          mutable=["codebook"],
          rngs={"codebook": k_code},
        )
        return out["recon"], (out, upd)

      def rec_loss(recon):
        value = cfg.l1_weight * losses.l1_loss(x, recon)
        if cfg.perceptual_weight > 0:
          value += cfg.perceptual_weight * losses.perceptual_loss(lpips_apply, k_slice, x, recon)
        return value

      def gan_loss(recon):
        _, rs = losses.random_slices(k_slice, x, recon)
        fi = disc(image_disc, dp["image"], ds["image"], rs)[0][0]
        fv = disc(volume_disc, dp["volume"], ds["volume"], recon)[0][0]
        return cfg.image_gan_weight * losses.g_loss(
          cfg.gan_loss, fi
        ) + cfg.volume_gan_weight * losses.g_loss(cfg.gan_loss, fv)

      kernel = losses.last_layer(params)
      lam = jnp.ones(())  # only read when the GAN terms are on (use_gan)
      if use_gan and cfg.adaptive_weight:
        recon, (out, upd), g_rec, g_gan = losses.last_layer_grads(
          forward, kernel, rec_loss, gan_loss
        )
        lam = losses.adaptive_weight(g_rec, g_gan)
      else:
        recon, (out, upd) = forward(kernel)
      xs, rs = losses.random_slices(k_slice, x, recon)
      perceptual = jnp.mean(lpips_apply(xs, rs)) if cfg.perceptual_weight > 0 else jnp.zeros(())
      if use_gan:
        fake_img = disc(image_disc, dp["image"], ds["image"], rs)[0]
        real_img = disc(image_disc, dp["image"], ds["image"], xs)[0]
        fake_vol = disc(volume_disc, dp["volume"], ds["volume"], recon)[0]
        real_vol = disc(volume_disc, dp["volume"], ds["volume"], x)[0]
      else:  # warm-up: the GAN terms are multiplied by 0; skip the discriminators entirely
        zero = (jnp.zeros((1,)), [jnp.zeros((1,))])
        fake_img = real_img = fake_vol = real_vol = zero
      loss, terms = losses.vqgan_generator_loss(
        x,
        recon,
        out["commitment_loss"],
        perceptual,
        fake_img,
        real_img,
        fake_vol,
        real_vol,
        cfg,
        state["step"] if use_gan else -1,
        lam,
      )
      terms.update(perplexity=out["perplexity"], live_codes=out["live_codes"].astype(jnp.float32))
      return loss, (terms, upd["codebook"], recon, xs, rs)

    (_, (terms, codebook, recon, xs, rs)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      state["params"]
    )
    updates, g_opt = g_tx.update(grads, state["g_opt"], state["params"])
    new = dict(
      state,
      params=optax.apply_updates(state["params"], updates),
      g_opt=g_opt,
      codebook=codebook,
      step=state["step"] + 1,
    )
    terms["g_grad_norm"] = optax.tree.norm(grads)
    if use_gan:
      fake_vol, fake_img = jax.lax.stop_gradient(recon), jax.lax.stop_gradient(rs)

      def d_loss_fn(params):
        (ri, _), s_img = disc(image_disc, params["image"], ds["image"], xs)
        (fi, _), s_img = disc(image_disc, params["image"], s_img, fake_img)
        (rv, _), s_vol = disc(volume_disc, params["volume"], ds["volume"], x)
        (fv, _), s_vol = disc(volume_disc, params["volume"], s_vol, fake_vol)
        d, d_terms = losses.vqgan_discriminator_loss(ri, fi, rv, fv, cfg, state["step"])
        return d, (d_terms, {"image": s_img, "volume": s_vol})

      (_, (d_terms, stats)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(dp)
      d_updates, d_opt = d_tx.update(d_grads, state["d_opt"], dp)
      new.update(disc_params=optax.apply_updates(dp, d_updates), d_opt=d_opt, disc_stats=stats)
      terms.update(d_terms, d_grad_norm=optax.tree.norm(d_grads))
    return new, terms

  return step


def make_eval_step(config: ml_collections.ConfigDict) -> Callable[[State, jax.Array], dict]:
  """Pure `eval(state, images[0,1]) -> {"recon", "l1", "psnr", "ssim"}` (per volume, [0, 1])."""
  model = VQGAN.from_config(config.model)

  def evaluate(state: State, images: jax.Array) -> dict:
    out = model.apply(
      {"params": state["params"], "codebook": state["codebook"]}, to_model_range(images)
    )
    recon = from_model_range(out["recon"])
    return {
      "recon": recon,
      "l1": jnp.mean(jnp.abs(recon - images), axis=(1, 2, 3, 4)),
      "psnr": image_metrics.psnr(recon, images),
      "ssim": image_metrics.ssim(recon, images),
      "perplexity": out["perplexity"],
    }

  return evaluate

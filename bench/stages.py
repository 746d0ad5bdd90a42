"""The benchmark stages: each builds its compiled work from the command line's options.

`vqgan_ae`, `vqgan` and `flow` time the thesis models' steps, `conv3` and `resblock` the
autoencoder's widest pieces alone, `sample` Euler-50 and tsit5 solves with a decode (see
`bench.run` for what each measures).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.measure import Work, compile_step
from latentfm.train import compiler

# The stages `bench/torch_run.py` has a PyTorch counterpart of.
TORCH_STAGES = ("vqgan_ae", "vqgan", "flow", "conv3", "resblock")


def vqgan_config(size: int, downsample: int):
  """The thesis VQ-GAN config at `size`³ with `downsample` per axis, one batch per step."""
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel

  config = get_config("thesis")
  config.data.shape = (size,) * 3
  config.optim.accumulate = 1
  config.model.downsample = (downsample,) * 3
  return config


def _model_options(model, args: argparse.Namespace) -> None:
  """`--dtype`, `--remat` and `--recompute-norms` on a config's `model` section (both stages)."""
  model.dtype, model.remat, model.recompute_norms = args.dtype, args.remat, args.recompute_norms


def _suffix(args) -> str:
  light = " recompute-norms" if args.recompute_norms else ""
  return f" {args.dtype}{' remat' if args.remat else ''}{light} f{args.downsample}"


def bench_vqgan_ae(args) -> list[Work]:
  from latentfm.nn.vqgan import VQGAN  # pylint: disable=import-outside-toplevel

  config = vqgan_config(args.size, args.downsample)
  _model_options(config.model, args)
  model = VQGAN.from_config(config.model)
  shape = (args.batch,) + (args.size,) * 3 + (1,)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32)
  variables = compiler.jit(model.init)(jax.random.PRNGKey(0), x)

  def loss(params, x):
    z = model.apply({**variables, "params": params}, x, method=model.encode)
    recon = model.apply({**variables, "params": params}, z, method=model.decode)
    return jnp.mean(jnp.abs(recon - x))

  step, flops = compile_step(jax.grad(loss), variables["params"], x)
  return [
    Work(
      "vqgan_ae",
      f"vqgan_ae fwd+bwd {args.size}^3 b{args.batch}{_suffix(args)}",
      lambda: step(variables["params"], x),
      args.batch,
      flops,
      args.dtype,
    )
  ]


def bench_vqgan(args) -> list[Work]:
  # pylint: disable=import-outside-toplevel
  from latentfm.nn.lpips import load_params
  from latentfm.train.vqgan_step import create_state, make_train_step

  config = vqgan_config(args.size, args.downsample)
  _model_options(config.model, args)
  state = create_state(jax.random.PRNGKey(0), config)
  lpips = load_params()
  batch = {
    "image": jnp.asarray(
      np.random.default_rng(0).random((args.batch,) + (args.size,) * 3 + (1,), dtype=np.float32)
    )
  }
  step, flops = compile_step(
    make_train_step(config, use_gan=True), state, batch, lpips, donate_state=True
  )
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], batch, lpips)
    return metrics

  return [
    Work(
      "vqgan",
      f"vqgan train step {args.size}^3 b{args.batch}{_suffix(args)}",
      call,
      args.batch,
      flops,
      args.dtype,
    )
  ]


def bench_flow(args) -> list[Work]:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.flow import get_config
  from latentfm.train.flow_step import create_state, make_train_step

  config = get_config("thesis")
  _model_options(config.model, args)
  latent = (args.size // args.downsample,) * 3 + (8,)
  state = create_state(jax.random.PRNGKey(0), config, latent)
  z = {
    "image": jnp.asarray(
      np.random.default_rng(0).standard_normal((args.batch,) + latent), jnp.float32
    )
  }
  step, flops = compile_step(make_train_step(config), state, z, donate_state=True)
  holder = {"s": state}

  def call():
    holder["s"], metrics = step(holder["s"], z)
    return metrics

  return [
    Work(
      "flow",
      f"flow train step {latent[0]}^3x8 b{args.batch}{_suffix(args)}",
      call,
      args.batch,
      flops,
      args.dtype,
    )
  ]


def piece_width() -> int:
  """Channels of the thesis decoder's last stage, the widest at full size."""
  from experiments.configs.vqgan import get_config  # pylint: disable=import-outside-toplevel

  return 2 * get_config("thesis").model.n_hiddens


def _piece(stage: str, make_module: Callable[[int], Any], args) -> list[Work]:
  """Forward + backward of mean |module(x)| for x of `piece_width()` channels at full size,
  the module made by `make_module(width)`.

  The loss reads the output, so the forward pass stays in the program: a vjp alone would let
  XLA drop the forward convolutions, which its backward does not need.
  """
  width = piece_width()
  module = make_module(width)
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((args.batch,) + (args.size,) * 3 + (width,)),
    jnp.float32,
  )
  params = compiler.jit(module.init)(jax.random.PRNGKey(0), x)
  loss = lambda p, x: jnp.mean(jnp.abs(module.apply(p, x).astype(jnp.float32)))
  step, flops = compile_step(jax.grad(loss, argnums=(0, 1)), params, x)
  return [
    Work(
      stage,
      f"{stage} fwd+bwd {args.size}^3x{width} b{args.batch} {args.dtype}",
      lambda: step(params, x),
      args.batch,
      flops,
      args.dtype,
    )
  ]


def bench_conv3(args) -> list[Work]:
  from latentfm.nn.layers import SamePadConv  # pylint: disable=import-outside-toplevel

  return _piece("conv3", lambda width: SamePadConv(width, 3, 1, jnp.dtype(args.dtype)), args)


def bench_resblock(args) -> list[Work]:
  from latentfm.nn.layers import ResBlock  # pylint: disable=import-outside-toplevel

  return _piece(
    "resblock",
    lambda width: ResBlock(dtype=jnp.dtype(args.dtype), recompute_norms=args.recompute_norms),
    args,
  )


def bench_sample(args) -> list[Work]:
  # pylint: disable=import-outside-toplevel
  from experiments.configs.flow import get_config as flow_config
  from latentfm.nn.unet3d import UNet3D
  from latentfm.nn.vqgan import VQGAN
  from latentfm.sample import integrate, velocity_from_model

  flow = flow_config("thesis")
  flow.model.dtype = args.dtype
  unet = UNet3D.from_config(flow.model)
  vq_config = vqgan_config(args.size, args.downsample)
  vq_config.model.dtype = args.dtype
  vq = VQGAN.from_config(vq_config.model)
  z1 = jax.random.normal(jax.random.PRNGKey(0), (1,) + (args.size // args.downsample,) * 3 + (8,))
  init = compiler.jit(lambda k: unet.init(k, z1, jnp.zeros((1,))))
  params = init(jax.random.PRNGKey(1))["params"]
  vq_vars = compiler.jit(vq.init)(jax.random.PRNGKey(2), jnp.zeros((1,) + (args.size,) * 3 + (1,)))
  decode = compiler.jit(lambda v, z: vq.apply(v, z, method=vq.decode))
  velocity = velocity_from_model(unet.apply, params)
  return [
    Work(
      "sample",
      f"sample {solver} + decode {args.size}^3 {args.dtype} f{args.downsample}",
      lambda s=solver: decode(vq_vars, integrate(velocity, z1, solver=s, steps=50)[0]),
      1,
    )
    for solver in ("euler", "tsit5")
  ]

r"""Latent flow matching stage configurations.

  python -m experiments.flow --config experiments/configs/flow.py:demo --workdir runs/flow_demo \
    --config.vqgan_workdir=runs/vqgan_demo

Names: `thesis` (the thesis settings; the thesis gives only the UNet's size, 151.6 MB of
float32, and this layout has 37,910,568 parameters on 16^3 x 8 latents; of the losses it
compared, L1 and the hybrid worked, and the hybrid is used), `default` (our best settings),
`demo` and `cpu64` (a small stage-conditional UNet that trains on 2 CPU cores in minutes on
16^3 x 8 latents), `res128` (the `default` UNet on the 64^3 x 8 latents of `vqgan.py:res128`,
bfloat16 and remat; sample with `experiments.sample --decode_tile 32`), `ddpm` (the thesis'
diffusion baseline, medicaldiffusion's latent DDPM, on the thesis UNet; `latentfm.ddpm` says
where it differs), `ddpm_demo` and `ddpm_cpu64` (the `demo` and `cpu64` runs with the DDPM
objective: the same UNet, batch and seed, a lower learning rate).
`vqgan_workdir` (the workdir of a trained VQ-GAN stage) is required.
Any field can be overridden on the command line, e.g. `--config.train.num_steps=500`.
"""

import ml_collections

from experiments.configs import shared


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.vqgan_workdir = ml_collections.FieldReference(None, field_type=str)  # required

  # Velocity network (latentfm.nn.unet3d.UNet3D). Levels run fine -> coarse; latent spatial
  # sizes must be divisible by 2 ** (len(channel_mults) - 1).
  c.model = ml_collections.ConfigDict()
  c.model.channels = 80
  c.model.channel_mults = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attention_levels = (2, 3)  # the two coarsest (4^3 and 2^3 at a 16^3 latent)
  c.model.num_heads = 4
  c.model.dropout = 0.5
  c.model.time_embed_dim = 320  # 4 x channels
  c.model.norm_groups = 32
  # t * time_scale enters the sinusoidal time embedding. 1000 (DDPM's convention) makes the
  # field oscillate in t; 10 keeps it smooth, so tsit5 matches Euler-100 with ~25 NFE.
  c.model.time_scale = 1000.0
  c.model.dtype = "float32"  # "bfloat16": mixed precision (parameters, Adam and EMA in float32)
  c.model.remat = False  # recompute residual blocks in backward (less memory, ~1.3x compute)
  # Recompute only the GroupNorm + SiLU intermediates (less memory, slower: bench/RESULTS.md,
  # "CPU kernel choices", row "recompute_norms").
  c.model.recompute_norms = False
  # Class-conditional field (labels from the data's manifest.csv `stage`/`label` column):
  # 0 = unconditional; K adds a label embedding for classes 0..K-1 plus a learned null class.
  c.model.num_classes = 0
  # Convolution implementation (latentfm.nn.layers): "auto" (XLA:CPU formulations on the CPU,
  # XLA's own elsewhere), "fast" or "lax" (needed for forward-mode autodiff). Same numbers.
  c.model.conv_impl = "auto"

  c.flow = ml_collections.ConfigDict()
  # What the UNet learns: "rectified_flow" (velocity; the fields below) or "ddpm" (noise; the
  # `ddpm` section). Trainer, checkpoints, EMA and sharding are shared.
  c.flow.objective = "rectified_flow"
  c.flow.loss = "hybrid"  # "l2" | "l1" | "hybrid" (0.9 L1 + 0.1 L2)
  c.flow.time_sampling = "uniform"  # "uniform" | "logit_normal"
  c.flow.logit_normal_mean = 0.0
  c.flow.logit_normal_std = 1.0
  # Also train on the training volumes mirrored along the VQ-GAN's data.flip_axes (encoded once):
  # more subjects for small data sets, at no cost per step.
  c.flow.flip_latents = False
  # Classifier-free guidance: the probability that a training label is replaced by the null
  # class, so that one network also learns the unconditional field (conditional models only).
  c.flow.p_uncond = 0.1
  # Draw every class equally often in training (`loader.class_balanced`), for imbalanced data.
  c.flow.balance_classes = False

  # The DDPM objective (latentfm.ddpm), used when flow.objective = "ddpm". medicaldiffusion's
  # values: cosine schedule (s 0.008, betas <= 0.9999), 300 steps, noise target, L1 loss.
  c.ddpm = ml_collections.ConfigDict()
  c.ddpm.num_timesteps = 300
  c.ddpm.schedule = "cosine"  # "cosine" | "linear"
  c.ddpm.cosine_s = 0.008
  c.ddpm.max_beta = 0.9999
  c.ddpm.loss = "l1"  # "l2" | "l1" | "hybrid", as flow.loss
  # Samplers clip predicted z0 to the training latents' range (medicaldiffusion: to its [-1, 1]).
  c.ddpm.clip_denoised = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.995
  shared.schedule(c.optim)

  c.train = shared.train(batch_size=2, log_every=100, ckpt_every=5_000)
  c.train.sample_every = 5_000  # 0: no sample previews

  c.sample = ml_collections.ConfigDict()
  # Rectified flow: euler | heun | midpoint (fixed step) | tsit5 | dopri5 (adaptive).
  # DDPM: ddpm (ancestral, all num_timesteps steps) | ddim (`steps` steps, noise level `eta`).
  c.sample.solver = "euler"
  c.sample.steps = 50  # fixed-step solvers: number of steps; adaptive: initial step 1/steps
  c.sample.eta = 0.0  # ddim only: 0 deterministic, 1 ancestral
  c.sample.rtol = 1e-5
  c.sample.atol = 1e-5
  c.sample.guidance = 1.0  # conditional models: CFG weight w of the preview samples
  return c


def _cpu(
  c: ml_collections.ConfigDict, num_steps: int, lr: float, batch_size: int
) -> ml_collections.ConfigDict:
  """The CPU recipe (bench/RESULTS.md, quality ablation) for 16³ x 8 latents: a 3-level UNet
  (16³, 8³, 4³) with attention only at 4³ (global context over 64 tokens, cheaply), AdamW with
  warm-up and cosine decay,
  the training volumes and their mirror images. For the demo, 2e-3 gave a lower Fréchet
  distance than 1e-3 and so did twice the steps at half the batch; cpu64 keeps the settings it
  was measured with."""
  c.model.channels = 32
  c.model.channel_mults = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attention_levels = (2,)
  c.model.num_heads = 2
  c.model.dropout = 0.0
  c.model.time_embed_dim = 128
  c.model.time_scale = 10.0
  c.model.num_classes = 4  # the embedded cohort's atrophy stages
  c.flow.flip_latents = True
  c.optim.lr = lr
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  c.optim.ema_decay = 0.99
  c.train.batch_size = batch_size
  c.train.num_steps = num_steps
  c.train.log_every = 20
  c.train.sample_every = num_steps // 2
  c.train.ckpt_every = num_steps // 2
  c.train.keep_checkpoints = 2
  return c


def _res128(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `default` UNet on 64³ x 8 latents (levels 64³, 32³, 16³, 8³): self-attention only at
  8³, since 16³ would attend over 4,096 tokens; bfloat16 and recomputed residual blocks."""
  c.model.attention_levels = (3,)
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.train.batch_size = 8
  return c


def with_ddpm_objective(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` with the DDPM objective on its network, data and optimizer; previews with DDIM-50 at
  eta = 1 (eta = 0 amplifies the trained predictor's error: `latentfm.ddpm`)."""
  c.flow.objective = "ddpm"
  c.sample.solver = "ddim"
  c.sample.steps = 50
  c.sample.eta = 1.0
  return c


def get_config(name: str = "default") -> ml_collections.ConfigDict:
  """Returns the named configuration: `thesis`, `default`, `demo`, `cpu64`, `res128`, `ddpm`,
  `ddpm_demo` or `ddpm_cpu64`."""
  c = _base()
  if name == "thesis":
    return c
  if name in ("default", "res128"):
    c.model.dropout = 0.1
    c.model.time_scale = 10.0  # smooth in t: adaptive solvers need ~4x fewer NFE (bench.solvers)
    c.flow.time_sampling = "logit_normal"
    c.optim.lr = 1e-4
    c.train.batch_size = 16
    return c if name == "default" else _res128(c)
  if name == "demo":  # the demo VQ-GAN's 16³ x 8 latents (32³ volumes)
    return _cpu(c, 1600, 2e-3, 4)
  if name == "cpu64":  # the cpu64 VQ-GAN's 16³ x 8 latents (64³ volumes)
    return _cpu(c, 1600, 1e-3, 8)
  if name == "ddpm":  # medicaldiffusion's latent DDPM on the thesis UNet
    c.model.time_scale = float(c.ddpm.num_timesteps)  # the embedding sees the integer step
    c.optim.lr = 1e-4  # medicaldiffusion's train_lr; its EMA decay is 0.995 as the thesis'
    return with_ddpm_objective(c)
  # The demo and cpu64 runs under the DDPM objective (bench.fm_vs_ddpm), at 5e-4: at the flow's
  # 2e-3 the noise predictor collapsed to a zero output by step 180 of the demo (L1 loss back to
  # E|eps| = 0.80 and staying there); at 5e-4 it reached 0.47 by step 100.
  if name == "ddpm_demo":
    return with_ddpm_objective(_cpu(c, 1600, 5e-4, 4))
  if name == "ddpm_cpu64":
    return with_ddpm_objective(_cpu(c, 1600, 5e-4, 8))
  raise ValueError(
    f"unknown config {name!r}; choose thesis, default, demo, cpu64, res128, ddpm, "
    "ddpm_demo or ddpm_cpu64"
  )

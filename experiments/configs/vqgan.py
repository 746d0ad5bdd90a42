r"""VQ-GAN stage configurations.

  python -m experiments.vqgan --config experiments/configs/vqgan.py:demo --workdir runs/vqgan_demo

Names: `thesis` (the thesis settings exactly), `default` (our best settings), `demo` (trains on
the embedded cohort on 2 CPU cores in minutes), `cpu64` (the thesis' 64³ on 2 CPU cores in
under an hour with its flow), `res128` (128³ with one downsampling stage, a 64³ x 8 latent, on
accelerators: bfloat16 and remat; pair it with `flow.py:res128`). Any field can be overridden
on the command line, e.g. `--config.train.num_steps=500`.

  python -m experiments.vqgan --config experiments/configs/vqgan.py:res128 --workdir runs/vq128
"""

import ml_collections

from experiments.configs import shared


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: `dir=None` generates the embedded MNI152-based cohort into the workdir.
  c.data = ml_collections.ConfigDict()
  c.data.dir = ml_collections.FieldReference(None, field_type=str)
  c.data.cohort_size = 40
  # Embedded cohort's stage weights (normal, mild, moderate, advanced); None: balanced.
  c.data.stage_proportions = ml_collections.FieldReference(None, field_type=tuple)
  c.data.shape = (64, 64, 64)
  c.data.spacing = 1.0
  c.data.val_fraction = 0.2
  c.data.split_seed = 0
  c.data.augment = True
  c.data.flip_axes = (2,)  # left-right only: the anatomy is not symmetric along the other axes
  c.data.intensity_range = (0.7, 1.0)
  c.data.worker_count = 0
  # NaN/Inf voxels (FSL and SPM write NaN outside brain masks): "reject" the file or "zero" them
  # (counted in the log).
  c.data.nonfinite = "reject"
  # Unusable files are listed all at once and stop the run; True trains without them and
  # writes the list to the workdir's skipped_files.txt.
  c.data.skip_bad_files = False

  c.model = ml_collections.ConfigDict()
  c.model.image_channels = 1
  c.model.n_hiddens = 16
  c.model.downsample = (4, 4, 4)
  c.model.embedding_dim = 8
  c.model.n_codes = 12288
  c.model.norm_groups = 32
  c.model.codebook_decay = 0.99
  c.model.restart_dead_codes = True
  # Decoder upsampling: "transposed" (the reference's transposed conv k4 s2) or "resize"
  # (nearest upsampling + conv k3, no stride-period checkerboard; latentfm.nn.vqgan.Decoder).
  c.model.upsampler = "transposed"
  c.model.disc_channels = 64
  c.model.disc_layers = 3
  # Mixed precision and memory (accelerators): computation dtype of the autoencoder and both
  # discriminators ("bfloat16"; parameters, optimizer state, quantiser and losses stay float32)
  # and recomputation of the residual blocks in the backward pass, or of the GroupNorm + SiLU
  # intermediates only (less memory, slower: bench/RESULTS.md, "CPU kernel choices", row
  # "recompute_norms"). Same parameter layout.
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.recompute_norms = False
  # Convolution implementation of the autoencoder, both discriminators and LPIPS
  # (latentfm.nn.layers): "auto" (XLA:CPU formulations on the CPU, XLA's own elsewhere), "fast"
  # or "lax". Same numbers and parameters; "lax" is needed for forward-mode autodiff.
  c.model.conv_impl = "auto"

  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 4.0
  c.loss.commitment_weight = 0.25
  c.loss.perceptual_weight = 4.0
  c.loss.gan_feat_weight = 4.0
  c.loss.image_gan_weight = 1.0
  c.loss.volume_gan_weight = 1.0
  c.loss.gan_loss = "hinge"  # or "vanilla"
  c.loss.adaptive_weight = False  # thesis eq. 3.9
  c.loss.discriminator_start = 10_000

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.grad_clip = 1.0
  c.optim.accumulate = 2  # gradient accumulation steps (optax.MultiSteps)
  shared.schedule(c.optim)

  c.train = shared.train(batch_size=8, log_every=50, ckpt_every=1000)
  c.train.image_every = 1000
  c.train.eval_every = 1000
  c.train.eval_volumes = 8
  return c


def _cpu(
  c: ml_collections.ConfigDict,
  shape: tuple[int, int, int],
  downsample: tuple[int, ...],
  num_steps: int,
) -> ml_collections.ConfigDict:
  """The CPU recipe (bench/RESULTS.md, quality ablation): small widths, 4,096 codes, no
  intensity-scaling augmentation (the quantised latent then cannot carry a volume's global
  gain, and reconstructions come out at the training set's mean brightness), Adam (0.5, 0.9) at
  1e-3 with warm-up and cosine decay, L1 + commitment only (LPIPS weight 1 cost 2.2 dB of
  validation PSNR at equal steps; the GAN phase has not been ablated with this recipe)."""
  c.data.cohort_size = 40
  c.data.shape = shape
  c.data.intensity_range = (1.0, 1.0)
  c.model.n_hiddens = 8
  c.model.downsample = downsample
  c.model.n_codes = 4096
  c.model.disc_channels = 16
  c.model.disc_layers = 2
  c.loss.perceptual_weight = 0.0
  c.loss.discriminator_start = num_steps  # no GAN phase
  c.optim.lr = 1e-3
  c.optim.accumulate = 1
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.train.batch_size = 2
  c.train.num_steps = num_steps
  c.train.log_every = 10
  c.train.image_every = num_steps // 3
  c.train.eval_every = num_steps // 3
  c.train.ckpt_every = num_steps // 3
  c.train.eval_volumes = 8
  return c


def _res128(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """128³ volumes with one downsampling stage (the thesis' first item of future work: it could
  not fit (2, 2, 2) in 11 GB and names the 4x compression as the main cause of blur). The
  `default` recipe at the thesis' widths, computed in bfloat16 with every residual block
  recomputed in the backward pass (parameters, optimizer state and losses stay float32)."""
  c.data.shape = (128, 128, 128)
  c.model.downsample = (2, 2, 2)
  c.model.dtype = "bfloat16"
  c.model.remat = True
  return c


def get_config(name: str = "default") -> ml_collections.ConfigDict:
  """Returns the named configuration: `thesis`, `default`, `demo`, `cpu64` or `res128`."""
  c = _base()
  if name == "thesis":
    return c
  if name in ("default", "res128"):
    c.data.intensity_range = (1.0, 1.0)  # see _cpu
    c.loss.adaptive_weight = True
    c.optim.accumulate = 1
    c.optim.warmup_steps = 500
    c.optim.schedule = "cosine"
    c.loss.discriminator_start = 5_000
    return c if name == "default" else _res128(c)
  if name == "demo":  # 32³ with a 16³ x 8 latent: minutes on 2 CPU cores
    return _cpu(c, (32, 32, 32), (2, 2, 2), 500)
  if name == "cpu64":  # the thesis' 64³ and 16³ x 8 latent, within an hour on 2 CPU cores
    return _cpu(c, (64, 64, 64), (4, 4, 4), 900)
  raise ValueError(f"unknown vqgan config {name!r}; choose thesis, default, demo, cpu64 or res128")

"""The PyTorch modules of the benchmarks compute what the JAX modules compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentfm.nn.unet3d import UNet3D

torch = pytest.importorskip("torch", reason="the PyTorch benchmark modules need the test extra")
# pylint: disable=wrong-import-position
from bench import torch_models
from bench.torch_models import FlowUNet3d, load_affine, load_conv, load_flax_unet
from bench.torch_vqgan import PatchDiscriminator, VQGANTrainStep, load_flax_discriminator
from experiments.configs.vqgan import get_config
from latentfm.nn import discriminators, layers


def test_thesis_unet_parameter_count():
  assert sum(p.numel() for p in FlowUNet3d().parameters()) == 37_910_568


def test_unet_matches_jax_with_ported_weights():
  cfg = dict(
    channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=2,
    time_embed_dim=16,
    time_scale=10.0,
  )
  model = UNet3D(**cfg)
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 4, 4, 4, 4)).astype(np.float32)
  t = np.array([0.2, 0.9], np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(z), jnp.asarray(t))["params"]
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.2, p.shape), jnp.float32), params)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, z, t))

  ref = FlowUNet3d(
    in_channels=4,
    channels=8,
    mults=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    heads=2,
    dropout=0.0,
    tdim=16,
    time_scale=10.0,
  )
  load_flax_unet(ref, jax.device_get(params)).eval()
  with torch.no_grad():
    theirs = ref(torch.from_numpy(z.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t))
  theirs = theirs.numpy().transpose(0, 2, 3, 4, 1)
  assert sum(p.numel() for p in ref.parameters()) == sum(x.size for x in jax.tree.leaves(params))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("piece", ["conv3", "resblock"])
def test_benchmark_pieces_match_jax_with_ported_weights(piece):
  """`bench.run`'s conv3 / resblock stages time the same function in both frameworks: the
  loss mean |y| and its gradients for the input and every parameter."""
  c, rng = 8, np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 8, c)).astype(np.float32)
  model = layers.SamePadConv(c, 3) if piece == "conv3" else layers.ResBlock()
  params = jax.tree.map(
    lambda p: rng.normal(0, 0.3, p.shape).astype(np.float32),
    model.init(jax.random.key(0), x)["params"],
  )
  loss = lambda p, x: jnp.mean(jnp.abs(model.apply({"params": p}, x)))
  value, (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

  if piece == "conv3":
    ref = torch_models.SamePadConv3d(c, c, 3)
    load_conv(ref.conv, params)
    pairs = [(ref.conv, g_params)]
  else:
    ref = torch_models.ResBlock(c)
    for name in ("norm1", "norm2"):
      load_affine(getattr(ref, name), params[name])
    for name in ("conv1", "conv2"):
      load_conv(getattr(ref, name).conv, params[name])
    pairs = [(getattr(ref, n), g_params[n]) for n in ("norm1", "norm2")]
    pairs += [(getattr(ref, n).conv, g_params[n]) for n in ("conv1", "conv2")]
  tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(True)
  t_value = ref(tx).abs().mean()
  t_value.backward()

  def close(ours, theirs, scale=None):  # scale: a bias after its module's weight gradient
    scale = np.abs(theirs).max() if scale is None else scale
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * scale)

  close(value, t_value.item())
  close(g_x, np.moveaxis(tx.grad.numpy(), 1, -1))
  for module, grads in pairs:
    weight = module.weight.grad.numpy()
    if weight.ndim > 1:  # torch (out, in, *k) -> flax (*k, in, out)
      weight = np.moveaxis(weight, (0, 1), (-1, -2))
    close(grads["kernel" if weight.ndim > 1 else "scale"], weight)
    # conv1's bias feeds a GroupNorm: its true gradient is 0, both give rounding noise.
    close(grads["bias"], module.bias.grad.numpy(), scale=np.abs(weight).max())


@pytest.fixture
def one_thread():
  """Tiny convolutions: one PyTorch thread is fastest and is not slowed down by busy cores."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def test_thesis_discriminator_parameter_counts():
  model = get_config("thesis").model
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  jax_counts = [
    count(
      jax.eval_shape(d.init, jax.random.key(0), jnp.zeros((1,) + (16,) * dims + (1,)))["params"]
    )
    for d, dims in zip(discriminators.make_discriminators(model), (2, 3))
  ]
  torch_counts = [
    sum(
      p.numel()
      for p in PatchDiscriminator(model.disc_channels, model.disc_layers, dims).parameters()
    )
    for dims in (2, 3)
  ]
  assert jax_counts == torch_counts == [2_764_481, 11_049_665]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dims", [2, 3])
def test_discriminator_matches_jax_with_ported_weights(dims):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2,) + (16,) * dims + (1,)).astype(np.float32)
  model = discriminators.PatchDiscriminator(channels=8, num_layers=2, spatial_dims=dims)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
  params = jax.tree.map(lambda p: rng.normal(0, 0.2, p.shape).astype(np.float32), shapes["params"])
  stats = jax.tree.map(
    lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes["batch_stats"]
  )  # running mean and (positive) variance
  logits, feats = jax.jit(model.apply)({"params": params, "batch_stats": stats}, x)  # eval

  ref = load_flax_discriminator(PatchDiscriminator(8, 2, dims), params, stats).eval()
  with torch.no_grad():
    t_logits, t_feats = ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
  for ours, theirs in zip([logits, *feats], [t_logits, *t_feats]):
    theirs = np.moveaxis(theirs.numpy(), 1, -1)
    np.testing.assert_allclose(
      np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max()
    )


@pytest.mark.usefixtures("one_thread")
def test_torch_vqgan_step_trains_everything():
  pytest.importorskip("lpips", reason="the PyTorch VQ-GAN step uses the lpips package")
  config = get_config("thesis")
  config.data.shape, config.optim.accumulate = (16, 16, 16), 1
  config.model.n_hiddens, config.model.n_codes = 8, 64
  config.model.disc_channels, config.model.disc_layers = 8, 2
  torch.manual_seed(0)
  step = VQGANTrainStep(config)
  groups = {"autoencoder": step.ae, "image_disc": step.image_disc, "volume_disc": step.volume_disc}
  before = {name: [p.detach().clone() for p in m.parameters()] for name, m in groups.items()}
  metrics = step(torch.rand(2, 1, 16, 16, 16))
  assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
  assert bool(step.quantizer.initialized)
  assert not any(p.requires_grad for p in step.lpips.parameters()) and not step.lpips.training
  for name, m in groups.items():
    changed = [not torch.equal(a, b) for a, b in zip(before[name], m.parameters())]
    assert all(changed), (name, changed)


@pytest.mark.usefixtures("one_thread")
def test_torch_vqgan_step_runs_under_bf16_autocast_with_a_float32_codebook():
  pytest.importorskip("lpips", reason="the PyTorch VQ-GAN step uses the lpips package")
  config = get_config("thesis")
  config.data.shape, config.optim.accumulate = (16, 16, 16), 1
  config.model.n_hiddens, config.model.n_codes = 8, 256  # more codes than latent rows: restarts
  config.model.disc_channels, config.model.disc_layers = 8, 2
  torch.manual_seed(0)
  step = VQGANTrainStep(config)
  with torch.autocast("cpu", dtype=torch.bfloat16):
    metrics = step(torch.rand(2, 1, 16, 16, 16))
  assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
  assert step.quantizer.embeddings.dtype == torch.float32


def test_torch_unet_makes_no_tensors_off_its_device():
  model = FlowUNet3d().to("meta")  # a tensor made on the CPU inside forward fails on "meta"
  z, t = torch.empty(2, 8, 8, 8, 8, device="meta"), torch.empty(2, device="meta")
  assert model(z, t).shape == (2, 8, 8, 8, 8)

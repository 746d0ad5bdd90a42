"""Tests for the 3D UNet velocity field."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.flow import get_config
from latentfm.nn import group_norm, layers
from latentfm.nn.unet3d import UNet3D, count_params

THESIS_PARAMS = 37_910_568  # channels 80, mults (1, 2, 2, 2), 2 res blocks, attention (2, 3)


def random_params(model: UNet3D, z: jax.Array, seed: int = 0):
  """Random, non-zero parameters of the right shapes (no compiled init: fast on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, jnp.zeros(z.shape[0]))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      x = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    elif name == "scale":
      x = 1.0 + 0.1 * rng.normal(size=s.shape)
    else:
      x = 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _latent(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


TINY = UNet3D(
  channels=16,
  channel_mults=(1, 2),
  num_res_blocks=1,
  attention_levels=(1,),
  num_heads=2,
  dropout=0.5,
)


@pytest.fixture(scope="module")
def tiny():
  z = _latent((2, 8, 8, 8, 4))
  params = random_params(TINY, z)

  def run(t, key=None, train=False):
    key = jax.random.key(0) if key is None else key
    return TINY.apply({"params": params}, z, t, train=train, rngs={"dropout": key})

  return z, jax.jit(run, static_argnames="train")


def test_output_shape_matches_input(tiny):
  z, run = tiny
  assert run(jnp.array([0.2, 0.7])).shape == z.shape


@pytest.mark.parametrize(
  "model, shape", [(TINY, (1, 4, 8, 12, 3)), (UNet3D(8, (1, 1, 2), 1, (2,), 2), (1, 8, 4, 12, 2))]
)
def test_anisotropic_shapes(model, shape):
  z = _latent(shape)
  out = jax.jit(model.apply)({"params": random_params(model, z)}, z, jnp.full((1,), 0.5))
  assert out.shape == shape and bool(jnp.isfinite(out).all())


def test_indivisible_shape_raises():
  with pytest.raises(ValueError, match="divisible by 2"):
    TINY.init(jax.random.key(0), jnp.zeros((1, 8, 8, 7, 2)), jnp.zeros(1))


def test_time_conditioning_changes_output(tiny):
  _, run = tiny
  a, b = run(jnp.full((2,), 0.1)), run(jnp.full((2,), 0.9))
  assert float(jnp.abs(a - b).mean()) > 1e-3


def test_dropout_only_in_training(tiny):
  _, run = tiny
  t = jnp.full((2,), 0.5)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  e1, e2 = run(t, k1), run(t, k2)
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  r1, r2 = run(t, k1, train=True), run(t, k2, train=True)
  assert float(jnp.abs(r1 - r2).mean()) > 1e-3
  assert float(jnp.abs(r1 - e1).mean()) > 1e-3


def test_thesis_parameter_count():
  n = count_params(get_config("thesis"))
  print(f"thesis UNet3D parameters: {n:,}")
  assert n == THESIS_PARAMS
  assert abs(n / 37.9e6 - 1) < 0.02
  # 151.604 MB of float32 in the thesis.
  assert abs(4 * n / 1e6 - 151.604) < 0.1


def _frozen_group_stats(next_fun, args, kwargs, context):
  """GroupNorm (+ SiLU) whose statistics carry no derivative (same value, purely local tangent)."""
  if not (isinstance(context.module, group_norm.GroupNorm) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  (x,) = args
  gn, g = context.module, context.module.num_groups
  grouped = jax.lax.stop_gradient(x).reshape(x.shape[0], -1, g, x.shape[-1] // g)
  per_channel = lambda v: jnp.repeat(v, x.shape[-1] // g, axis=-1).reshape(
    x.shape[0], *(1,) * (x.ndim - 2), -1
  )
  mean = per_channel(grouped.mean(axis=(1, 3)))
  std = per_channel(jnp.sqrt(grouped.var(axis=(1, 3)) + gn.epsilon))  # (B, G) -> per channel
  params = gn.variables["params"]
  y = (x - mean) / std * params["scale"] + params["bias"]
  return nn.silu(y) if gn.silu else y


@pytest.mark.parametrize("attention", [False, True])
def test_attention_mixes_distant_voxels(attention):
  """Directional derivative of the output at voxels far from a perturbed one.

  The 12 convolutions of a one-level UNet reach 12 voxels; GroupNorm statistics are global but
  are held fixed here, so only attention can carry the perturbation along a 32-voxel axis.
  """
  model = UNet3D(16, (1,), 1, (0,) if attention else (), 2)
  z = _latent((1, 2, 2, 32, 2))
  params = random_params(model, z, seed=1)
  dz = jnp.zeros_like(z).at[0, 0, 0, 0].set(1.0)

  def f(z):
    with nn.intercept_methods(_frozen_group_stats):
      return model.apply({"params": params}, z, jnp.full((1,), 0.5))

  model = model.clone(conv_impl="lax")  # forward-mode autodiff needs the plain lax convolutions
  with layers.use_conv_impl("fast"):  # the module's own choice wins
    out, tangent = jax.jit(lambda z, dz: jax.jvp(f, (z,), (dz,)))(z, dz)
  np.testing.assert_allclose(
    out, model.apply({"params": params}, z, jnp.full((1,), 0.5)), atol=1e-5
  )
  near = float(jnp.abs(tangent[0, :, :, :3]).max())
  far = float(jnp.abs(tangent[0, :, :, 16:]).max())
  assert near > 1e-3
  if attention:
    assert far > 1e-3 * near
  else:
    assert far == 0.0


def test_time_scale_sets_smoothness_in_t():
  """The field's curvature in t grows with `time_scale` (fastest embedding frequency)."""
  z = _latent((1, 8, 8, 8, 4))
  params = random_params(TINY, z)
  t = jnp.array([0.49, 0.5, 0.51])

  def curvature(scale):
    model = TINY.clone(time_scale=scale, dropout=0.0)
    out = jax.jit(jax.vmap(lambda s: model.apply({"params": params}, z, s[None])))(t)
    return float(jnp.abs(out[0] - 2 * out[1] + out[2]).mean())

  assert curvature(1000.0) > 20 * curvature(10.0)


def test_from_config_time_scale():
  assert UNet3D.from_config(get_config("demo")).time_scale == 10.0
  assert UNet3D.from_config(get_config("thesis")).time_scale == 1000.0
  old = get_config("thesis").model.to_dict()
  del old["time_scale"]  # a config.json written before the option existed
  import ml_collections  # pylint: disable=import-outside-toplevel

  assert UNet3D.from_config(ml_collections.ConfigDict(old)).time_scale == 1000.0


@pytest.mark.parametrize("impl", ["lax", "auto"])
def test_from_config_conv_impl_reaches_every_convolution(impl):
  """`model.conv_impl` from the config decides every convolution of the UNet: "lax" leaves
  none of the CPU formulations' custom VJPs in the trace, "auto" (the CPU's) does."""
  cfg = get_config("demo")
  cfg.model.conv_impl = impl
  model = UNet3D.from_config(cfg)
  z, t = jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((1,))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), z, t)
  with layers.use_conv_impl("fast"):  # what "auto" means here; an explicit "lax" must win
    text = str(jax.make_jaxpr(jax.grad(lambda p: model.apply(p, z, t).sum()))(params))
  assert ("custom_vjp" in text) == (impl == "auto")


def _loss_and_grads(model, params, z):
  loss = lambda p: jnp.mean(model.apply({"params": p}, z, jnp.array([0.3])) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference():
  """TINY without dropout, its parameters, a latent, and its float32 loss and gradients."""
  z = _latent((1, 8, 8, 8, 4))
  model = TINY.clone(dropout=0.0)
  params = random_params(model, z)
  return model, params, z, _loss_and_grads(model, params, z)


@pytest.mark.parametrize("option", ["remat", "recompute_norms"])
def test_remat_keeps_layout_and_gradients(reference, option):
  model, params, z, (l0, g0) = reference
  remat = model.clone(**{option: True})
  shapes = jax.eval_shape(remat.init, jax.random.key(0), z, jnp.zeros(1))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)  # same checkpoint layout
  l1, g1 = _loss_and_grads(remat, params, z)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters(reference):
  model, params, z, (l0, _) = reference
  half = model.clone(dtype="bfloat16")
  init = jax.eval_shape(half.init, jax.random.key(0), z, jnp.zeros(1))["params"]
  assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
  t = jnp.array([0.3])
  full_out, half_out = jax.jit(
    lambda p: (model.apply({"params": p}, z, t), half.apply({"params": p}, z, t))
  )(params)
  assert half_out.dtype == jnp.float32
  err = float(jnp.abs(half_out - full_out).max() / jnp.abs(full_out).max())
  assert 1e-5 < err < 5e-2  # bf16 rounding: visibly not float32, still the same function
  l1, g1 = _loss_and_grads(half, params, z)
  assert {x.dtype for x in jax.tree.leaves(g1)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(float(l1), float(l0), rtol=5e-2)


def test_fast_convolutions_match_lax(reference):
  """The UNet's default (fast) convolutions compute what `lax.conv_general_dilated` does."""
  model, params, z, (l_fast, g_fast) = reference
  assert layers.resolve_conv_impl() == "fast"
  with layers.use_conv_impl("lax"):
    l_lax, g_lax = _loss_and_grads(model, params, z)
  np.testing.assert_allclose(float(l_fast), float(l_lax), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_lax)):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(np.asarray(b)).max())
    )


@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies(dim):
  from latentfm.nn.unet3d import timestep_embedding  # pylint: disable=import-outside-toplevel

  t = np.array([0.0, 0.25, 7.0])
  emb = np.asarray(timestep_embedding(jnp.asarray(t), dim))
  freqs = 10_000.0 ** (-np.arange(dim // 2) / (dim // 2))
  want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=-1)
  assert emb.shape == (3, dim)
  np.testing.assert_allclose(emb[:, : 2 * (dim // 2)], want, atol=2e-6)
  assert not emb[:, 2 * (dim // 2) :].any()  # an odd dim ends in a zero column

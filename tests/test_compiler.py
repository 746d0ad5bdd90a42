"""Compiler options of everything the library compiles, and the `compiler.jit` helper."""

import io
import pathlib
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentfm.nn import layers
from latentfm.train import compiler


def test_cpu_options_compile_and_keep_values():
  options = compiler.compiler_options()
  assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  block = layers.ResBlock(norm_groups=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 5, 7, 8)), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x)
  grad = lambda p, v: jax.grad(lambda p, v: (block.apply(p, v) ** 2).sum(), (0, 1))(p, v)
  with_options = jax.jit(grad, compiler_options=options)(params, x)
  default = jax.jit(grad)(params, x)
  for a, b in zip(jax.tree.leaves(with_options), jax.tree.leaves(default)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_unknown_option_falls_back_to_defaults(monkeypatch, caplog):
  monkeypatch.setattr(compiler, "_CPU_OPTIONS", {"xla_cpu_no_such_option_for_tests": "1"})
  compiler.compiler_options.cache_clear()
  try:
    assert compiler.compiler_options() is None
    assert "rejected" in caplog.text
  finally:
    compiler.compiler_options.cache_clear()


def test_jit_matches_jax_jit():
  f = lambda x, y: (jnp.sin(x) * y).sum()
  x, y = jnp.arange(6.0), jnp.full((6,), 0.5)
  np.testing.assert_allclose(compiler.jit(f)(x, y), jax.jit(f)(x, y), rtol=1e-6)
  donated = compiler.jit(lambda x: x * 2, donate_argnums=0)
  np.testing.assert_array_equal(donated(jnp.ones(3)), np.full(3, 2.0))
  scaled = compiler.jit(static_argnames="n")(lambda x, n: x * n)  # decorator with arguments
  np.testing.assert_array_equal(scaled(jnp.ones(2), n=3), np.full(2, 3.0))
  assert "stablehlo" in scaled.lower(jnp.ones(2), n=3).as_text()


ROOT = pathlib.Path(__file__).resolve().parents[1]
# Code that compiles without `latentfm.train.compiler` (names as the tokenizer sees them).
RAW_JIT = {
  ("jax", ".", "jit"),
  ("jax", ".", "pmap"),
  ("eqx", ".", "filter_jit"),
  ("import", "equinox"),
  ("import", "jit"),
  ("import", "pjit"),
}


def _raw_jits(path: pathlib.Path) -> list[int]:
  """Lines of `path` whose code (not strings or comments) calls a jit other than the helper's."""
  tokens = [
    t
    for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    if t.type in (tokenize.NAME, tokenize.OP)
  ]
  found = []
  for n in (2, 3):
    for window in zip(*(tokens[i:] for i in range(n))):
      if tuple(t.string for t in window) in RAW_JIT:
        found.append(window[0].start[0])
  return found


def test_library_compiles_only_through_the_compiler_helper():
  """Every function the library and its command lines compile goes through `compiler.jit` /
  `compiler.filter_jit`, so it gets the CPU options; a plain `jax.jit` there fails this."""
  files = [p for d in ("latentfm", "experiments") for p in sorted((ROOT / d).rglob("*.py"))]
  assert len(files) > 40
  offenders = {
    str(p.relative_to(ROOT)): lines
    for p in files
    if p.name != "compiler.py" and (lines := _raw_jits(p))
  }
  assert not offenders, f"compile with latentfm.train.compiler.jit instead: {offenders}"
  probe = ROOT / "latentfm" / "train" / "compiler.py"
  assert _raw_jits(probe)  # the detector sees the helper's own jax.jit


@pytest.fixture
def compiles(monkeypatch):
  """(module name, XLA option overrides) of every compilation while the test runs."""
  from jax._src import compiler as xla_compiler  # pylint: disable=import-outside-toplevel

  seen, original = [], xla_compiler.compile_or_get_cached

  def record(backend, computation, devices, options, *args, **kwargs):
    name = str(computation.operation.attributes["sym_name"]).strip('"')
    seen.append((name, dict(options.env_option_overrides)))
    return original(backend, computation, devices, options, *args, **kwargs)

  monkeypatch.setattr(xla_compiler, "compile_or_get_cached", record)
  return seen


def _assert_compiled_with_options(seen, names):
  for name in names:
    options = [o for n, o in seen if n == name]
    assert options, f"{name} was not compiled; compiled: {sorted({n for n, _ in seen})}"
    assert all(o == compiler.compiler_options() for o in options), (name, options)


def _filled(shapes, value=0.01):
  return jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), shapes)


def test_sampling_and_metrics_compile_with_the_options(compiles):
  """Sampling (the Diffrax solve, decode), image metrics and the random-conv features compile
  with the CPU options (shapes no other test compiles)."""
  from testing_support import tiny_vqgan_config  # pylint: disable=import-outside-toplevel

  from latentfm import flow, sample  # pylint: disable=import-outside-toplevel
  from latentfm.metrics import features, image  # pylint: disable=import-outside-toplevel
  from latentfm.nn.vqgan import VQGAN  # pylint: disable=import-outside-toplevel

  model = VQGAN.from_config(tiny_vqgan_config().model)
  z1 = jnp.ones((1, 4, 6, 4, model.embedding_dim))
  variables = _filled(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8, 12, 8, 1))))
  z0, _ = sample.integrate(lambda z, t: -z, z1, steps=2)
  stats = flow.LatentStats(np.zeros(z1.shape[-1], np.float32), np.ones(z1.shape[-1], np.float32))
  volumes = np.asarray(
    sample.decode(sample.Models(None, model, variables, stats, z1.shape[1:], 0, 0), z0)
  )
  image.psnr(volumes[..., None], volumes[..., None])
  image.ssim(volumes[..., None], volumes[..., None], win_size=3)
  features.random_conv_features(widths=(2,), scales=(1,), batch_size=1)(volumes)
  _assert_compiled_with_options(
    compiles, ["jit__integrate", "jit__decode", "jit_psnr", "jit_ssim", "jit__random_conv_apply"]
  )


def test_lpips_and_pretrained_features_compile_with_the_options(compiles):
  from latentfm.metrics import vgg_features  # pylint: disable=import-outside-toplevel
  from latentfm.nn import lpips  # pylint: disable=import-outside-toplevel

  volumes = np.linspace(0.0, 1.0, 8 * 12 * 8, dtype=np.float32).reshape(1, 8, 12, 8)
  image_shape = jnp.ones((1, 16, 16, 1))
  params = _filled(
    jax.eval_shape(lpips.LPIPS().init, jax.random.PRNGKey(0), image_shape, image_shape)
  )
  lpips.lpips_fn(params)(jnp.zeros((1, 17, 17, 1)), jnp.ones((1, 17, 17, 1)))
  vgg_features.vgg25d_features(params, num_slices=1, size=16, taps=(0,), batch_size=1)(volumes)
  _assert_compiled_with_options(compiles, ["jit_apply", "jit__features"])


def test_helper_functions_nest_inside_other_jits(compiles):
  """A library function called inside the user's own jit is traced into it (JAX rejects
  compiler options on nested jits) and the enclosing compile's options apply."""
  from latentfm.metrics import image  # pylint: disable=import-outside-toplevel

  x = jnp.linspace(0.0, 1.0, 2 * 5 * 3 * 7).reshape(2, 5, 3, 7)

  def psnr_plus_one(a, b):
    return image.psnr(a, b) + 1.0

  got = compiler.jit(psnr_plus_one)(x, x * 0.9)
  np.testing.assert_allclose(got, image.psnr(x, x * 0.9) + 1.0, rtol=1e-6)
  assert jax.jit(lambda a: image.mse(a, a))(x).shape == (2,)  # a user's plain jit works too
  _assert_compiled_with_options(compiles, ["jit_psnr_plus_one", "jit_psnr"])
  assert "jit_mse" not in [n for n, o in compiles if o]  # inlined, not compiled on its own

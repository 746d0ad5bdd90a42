"""The "fast" convolution formulations against plain `lax.conv_general_dilated` ("lax")."""

import contextlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import assert_close as _assert_close
from testing_arrays import normal as _normal
from testing_arrays import value_and_grads

from latentfm.nn import layers
from latentfm.nn.cpu import slab_conv, strided
from latentfm.train import compiler

MODULE_CASES = [
  # name, module, input shape
  ("same k4 s2 3D even", layers.SamePadConv(5, 4, 2), (2, 8, 8, 8, 3)),
  ("same k4 s2 3D odd", layers.SamePadConv(5, 4, 2), (1, 7, 5, 9, 3)),
  ("same k4 s212 3D", layers.SamePadConv(5, 4, (2, 1, 2)), (2, 8, 6, 8, 3)),
  ("same k4 s212 3D odd", layers.SamePadConv(5, 4, (2, 1, 2)), (1, 7, 5, 9, 3)),
  ("same k3 s1 3D", layers.SamePadConv(5, 3, 1), (2, 6, 7, 5, 3)),
  ("same k1 s1 3D", layers.SamePadConv(5, 1, 1), (2, 4, 4, 4, 3)),
  ("same k4 s2 2D", layers.SamePadConv(5, 4, 2), (2, 8, 7, 3)),
  ("same k3 s1 2D", layers.SamePadConv(5, 3, 1), (2, 9, 6, 3)),
  ("transpose k4 s2 3D even", layers.SamePadConvTranspose(5, 4, 2), (2, 4, 4, 4, 3)),
  ("transpose k4 s2 3D odd", layers.SamePadConvTranspose(5, 4, 2), (1, 3, 5, 3, 3)),
  ("transpose k4 s212 3D", layers.SamePadConvTranspose(5, 4, (2, 1, 2)), (1, 4, 3, 5, 3)),
  ("transpose k4 s2 2D", layers.SamePadConvTranspose(5, 4, 2), (2, 5, 4, 3)),
  ("zero k4 s2 p2 3D even", layers.ZeroPadConv(5, 4, 2, 2), (2, 8, 8, 8, 3)),
  ("zero k4 s2 p2 3D odd", layers.ZeroPadConv(5, 4, 2, 2), (1, 7, 9, 5, 3)),
  ("zero k4 s1 p2 3D", layers.ZeroPadConv(5, 4, 1, 2), (2, 5, 6, 5, 3)),
  ("zero k4 s2 p2 2D even", layers.ZeroPadConv(5, 4, 2, 2), (2, 8, 8, 3)),
  ("zero k4 s2 p2 2D odd", layers.ZeroPadConv(5, 4, 2, 2), (2, 9, 7, 3)),
  ("zero k4 s1 p2 2D", layers.ZeroPadConv(5, 4, 1, 2), (2, 6, 7, 3)),
  ("same k3 s1 3D to one channel", layers.SamePadConv(1, 3, 1), (2, 6, 7, 5, 3)),
  ("zero k4 s1 p2 3D to one channel", layers.ZeroPadConv(1, 4, 1, 2), (2, 5, 6, 5, 3)),
  ("zero k4 s2 p2 3D to one channel", layers.ZeroPadConv(1, 4, 2, 2), (1, 7, 9, 5, 3)),
  ("transpose k4 s2 3D to one channel", layers.SamePadConvTranspose(1, 4, 2), (1, 3, 5, 3, 3)),
]


def _outputs_and_grads(impl, params, xs, cts):
  """Per case: the output and d<y, ct>/d(params, x), all cases under one `jit`."""

  def one(module, p, x, ct):
    def f(p, x):
      y = module.apply({"params": p}, x)
      return (y * ct).sum(), y

    (_, y), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(p, x)
    return y, grads

  with layers.use_conv_impl(impl):
    return jax.jit(lambda *args: [one(c[1], *a) for c, *a in zip(MODULE_CASES, *args)])(
      params, xs, cts
    )


@pytest.fixture(scope="module")
def module_results():
  xs = [_normal(shape, i) for i, (_, _, shape) in enumerate(MODULE_CASES)]
  # Random parameters and cotangents of the right shapes (eval_shape: nothing compiled).
  shapes = [
    jax.eval_shape(m.init_with_output, jax.random.key(0), x)
    for (_, m, _), x in zip(MODULE_CASES, xs)
  ]
  params = [
    jax.tree.map(lambda a, i=i: _normal(a.shape, 100 + i) * 0.3, v["params"])
    for i, (_, v) in enumerate(shapes)
  ]
  cts = [_normal(y.shape, 200 + i) for i, (y, _) in enumerate(shapes)]
  return {impl: _outputs_and_grads(impl, params, xs, cts) for impl in ("fast", "lax")}


@pytest.mark.parametrize("index", range(len(MODULE_CASES)), ids=[c[0] for c in MODULE_CASES])
def test_module_outputs_and_gradients_match_lax(module_results, index):
  (y_fast, g_fast), (y_lax, g_lax) = (module_results[i][index] for i in ("fast", "lax"))
  assert y_fast.shape == y_lax.shape
  _assert_close(y_fast, y_lax)
  _assert_close(g_fast[1], g_lax[1])  # input
  _assert_close(g_fast[0]["kernel"], g_lax[0]["kernel"])
  _assert_close(g_fast[0]["bias"], g_lax[0]["bias"])


def test_conv_functions_match_lax_on_a_sweep():
  """Values and gradients over kernel, stride, padding (also uneven and wider than the kernel;
  crops for the transposed conv) and size combinations on 1-3 spatial axes."""
  rng = np.random.default_rng(0)
  configs, xs, ws = [], [], []
  for nd, k, s, p, n in itertools.product(
    (1, 2, 3), (2, 3, 5), (1, 2, 3), ((0, 0), (2, 2), (1, 3), (6, 1)), (5, 6)
  ):
    if nd == 3 and (k, n) != (3, 5):
      continue
    configs.append((nd, k, (s,) * nd if nd < 3 else (s, 1, 2), p))
    xs.append(jnp.asarray(rng.normal(size=(1,) + (n,) * nd + (2,)), jnp.float32))
    ws.append(jnp.asarray(rng.normal(size=(k,) * nd + (2, 3)), jnp.float32))

  def run(impl):
    # The reference pads first: XLA:CPU's own gradient of a convolution padded wider than its
    # kernel came out NaN or 1e25 (a negative padding in its transposed convolution).
    def both(x, w, nd, k, st, p):
      conv = (
        layers.conv(x, w, st, (p,) * nd, impl=impl)
        if impl == "fast"
        else layers.conv(slab_conv.zero_pad(x, (p,) * nd), w, st, ((0, 0),) * nd, impl=impl)
      )
      return conv, layers.conv_transpose(x, w, st, (min(p[0], k - 1),) * nd, impl=impl)

    def f(xs, ws):
      out = []
      for (nd, k, st, p), x, w in zip(configs, xs, ws):
        ys = both(x, w, nd, k, st, p)
        cts = [jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)) for y in ys]
        loss = lambda x, w, cfg=(nd, k, st, p), cts=cts: sum(
          jnp.vdot(y, c) for y, c in zip(both(x, w, *cfg), cts)
        )
        out.append((*ys, *jax.grad(loss, (0, 1))(x, w)))
      return out

    return jax.jit(f)(xs, ws)

  for config, fast, ref in zip(configs, run("fast"), run("lax")):
    for a, b in zip(fast, ref):
      assert a.shape == b.shape, config
      _assert_close(a, b)


def test_conv_transpose_subpixel_kernel_has_no_empty_taps():
  """k4 s2 crop 3: each output phase reads 2 inputs per axis (a 2x2x2 conv, no zero taps)."""
  offset, d_lo, taps = strided.subpixel_plan(4, 2, 3)
  assert (offset, d_lo) == (1, 0)
  assert taps.tolist() == [[2, 3], [0, 1]]


def _stride1_loss(ct, impl):
  """(x, w) -> <conv(x, w), ct> for a stride-1 VALID 3D conv of formulation `impl`."""
  return lambda x, w: (layers.conv(x, w, (1, 1, 1), ((0, 0),) * 3, impl=impl) * ct).sum()


def _assert_stride1_grads_match(x, w, ct):
  """d<conv(x, w), ct>/d(x, w) of a stride-1 VALID conv: "fast" equals "lax"."""
  grads = {impl: jax.grad(_stride1_loss(ct, impl), (0, 1))(x, w) for impl in ("fast", "lax")}
  for fast, ref in zip(grads["fast"], grads["lax"]):
    _assert_close(fast, ref)


@pytest.mark.parametrize("slab_dx", [False, True])
@pytest.mark.parametrize("chunk", [None, 24, 60])
def test_stride1_slab_gradients_match_lax(request, monkeypatch, chunk, slab_dx):
  """Also with tiny chunks, so that the dW convs run in pieces (one slice; 3 + a remainder),
  and with the input gradient as taps (the default at this size) or as slab convolutions."""
  if slab_dx:
    request.getfixturevalue("slab_input_gradient")
  if chunk is not None:
    monkeypatch.setattr(slab_conv, "_CHUNK_DW", chunk)
  x, w = _normal((2, 6, 5, 7, 3), 1), _normal((3, 2, 3, 3, 4), 2)
  ct = _normal((2, 4, 4, 5, 4), 3)
  _assert_stride1_grads_match(x, w, ct)


@pytest.mark.parametrize("ci,co", [(3, 3), (4, 2)])
def test_stride1_slab_gradients_match_lax_deep(slab_input_gradient, ci, co):
  """Depth 36 (34 output slices): the input gradient's cotangent-padding path."""
  x, w = _normal((1, 36, 4, 5, ci), 4), _normal((3, 3, 2, ci, co), 5)
  ct = _normal((1, 34, 2, 4, co), 6)
  _assert_stride1_grads_match(x, w, ct)


def test_kernel_gradient_chunks_get_buffers_of_their_own(monkeypatch):
  """One conditional per kernel-gradient chunk (3 + 1 output slices here); values unchanged,
  also for a NaN first element, whose predicate is false."""
  monkeypatch.setattr(slab_conv, "_CHUNK_DW", 60)
  x, w = _normal((2, 6, 5, 7, 3), 1), _normal((3, 2, 3, 3, 4), 2)
  ct = _normal((2, 4, 4, 5, 4), 3)
  compiled = compiler.jit(jax.grad(_stride1_loss(ct, "fast"), 1)).lower(x, w).compile()
  assert compiled.as_text().count(" conditional(") == 2  # kept by JAX and XLA
  for y in (x.at[0, 0, 0, 0, 0].set(jnp.nan), x.at[0, 0, 0, 0, 0].set(-0.0)):
    np.testing.assert_array_equal(
      np.asarray(jax.jit(slab_conv._own_buffer)(y)).view(np.uint32), np.asarray(y).view(np.uint32)
    )


def test_stride1_slab_gradients_match_lax_on_tiny_volumes(slab_input_gradient):
  """2x2x2 outputs: the input gradient's 3-tap kernel is longer than the outputs it pads, the
  case padded before the conv."""
  x, w = _normal((2, 4, 4, 4, 6), 7), _normal((3, 3, 3, 6, 4), 8)
  ct = _normal((2, 2, 2, 2, 4), 9)
  _assert_stride1_grads_match(x, w, ct)
  jaxpr = str(jax.make_jaxpr(jax.grad(_stride1_loss(ct, "fast")))(x, w))
  assert "optimization_barrier" in jaxpr


@pytest.mark.parametrize(
  "shape,kernel,pads",
  [
    ((2, 8, 6, 7, 8), (3, 3, 3, 8, 12), ((1, 1), (1, 1), (1, 1))),  # dx as Winograd tiles
    ((2, 5, 5, 5, 12), (4, 4, 4, 12, 8), ((2, 2), (2, 2), (2, 2))),  # few slices: depth as input
    ((1, 7, 4, 5, 3), (2, 3, 2, 3, 4), ((0, 3), (2, 0), (1, 1))),  # uneven, 2 depth taps
    ((1, 4, 5, 6, 3), (3, 2, 3, 3, 4), ((4, 0), (0, 0), (3, 1))),  # wider than the kernel: crops
    ((2, 1, 6, 7, 4), (1, 4, 3, 4, 5), ((0, 0), (2, 2), (1, 0))),  # 2D, lifted
    ((1, 5, 5, 5, 6), (4, 4, 4, 6, 1), ((2, 2), (2, 2), (2, 2))),  # one output channel
    ((1, 3, 3, 3, 4), (1, 1, 1, 4, 5), ((1, 1), (1, 1), (1, 1))),  # 1x1x1
  ],
)
def test_conv_padded_matches_lax_of_the_padded_input(shape, kernel, pads):
  """Value and gradients of `conv_padded` against `lax` on the zero-padded input."""
  x, w = _normal(shape, 1), _normal(kernel, 2)
  reference = lambda x, w: slab_conv.lax_valid(slab_conv.zero_pad(x, pads), w)
  ct = _normal(jax.eval_shape(reference, x, w).shape, 3)
  padded = lambda x, w: slab_conv.conv_padded(x, w, pads)
  (y, grads), (y_ref, grads_ref) = (value_and_grads(f, x, w, ct) for f in (padded, reference))
  _assert_close(y, y_ref)
  for grad, ref in zip(grads, grads_ref):
    _assert_close(grad, ref)
  with pytest.raises(ValueError, match="zero padding >= 0"):
    slab_conv.conv_padded(x, w, ((0, -1),) + pads[1:])


def test_conv_padded_input_gradient_skips_the_padding():
  """The discriminator's 4x4x4 layer on 5³ inputs padded by 2: the input gradient of the
  unpadded input does about half the products of a full correlation of the cotangent."""
  x, w, pads = _normal((2, 5, 5, 5, 16), 1), _normal((4, 4, 4, 16, 32), 2), ((2, 2),) * 3
  ct = _normal((2, 6, 6, 6, 32), 3)

  def input_gradient_flops(conv):
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(conv(x), ct)))
    return grad.lower(x).cost_analysis()["flops"]

  skipping = input_gradient_flops(lambda x: slab_conv.conv_padded(x, w, pads))
  full = input_gradient_flops(lambda x: slab_conv.conv_valid(slab_conv.zero_pad(x, pads), w))
  assert skipping < 0.6 * full, (skipping, full)


def test_few_output_slices_take_the_depth_taps_as_input_channels():
  """Under _WINOGRAD_MIN_SLICES output slices the forward is one 2D conv over kd x ci input
  channels, even where the channels shrink; with more slices, or 2 depth taps, the taps become
  output channels."""
  for depth, kd, channels in [(5, 4, 4 * 12), (12, 4, 12), (5, 2, 12)]:
    x, w = _normal((1, depth + kd - 1, 6, 6, 12), 1), _normal((kd, 3, 3, 12, 8), 2)
    jaxpr = jax.make_jaxpr(slab_conv._slab_fwd)(
      jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    )
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert [c.invars[1].aval.shape[2] for c in convs] == [channels]


@pytest.mark.parametrize(
  "cotangent,kernel,taps",
  [
    ((2, 6, 6, 6, 512), (4, 4, 4, 256, 512), True),  # the 3D discriminator's conv_3 at 32³
    ((2, 10, 10, 10, 512), (4, 4, 4, 256, 512), True),  # ... at 64³
    ((2, 8, 8, 8, 128), (3, 3, 3, 128, 128), True),  # full output 1.95x the cotangent
    ((2, 13, 13, 13, 256), (4, 4, 4, 128, 256), False),  # 1.73x: measured slower as taps
    ((2, 16, 16, 16, 128), (3, 3, 3, 128, 128), False),
    ((2, 64, 64, 64, 32), (3, 3, 3, 32, 32), False),
    ((8, 10, 10, 10, 512), (4, 4, 4, 256, 512), False),  # tap columns over 256 MiB
    ((4, 1, 6, 6, 512), (1, 4, 4, 256, 512), True),  # 2D, lifted: 2.25x
  ],
)
def test_input_gradient_as_taps_where_the_full_correlation_is_mostly_border(
  cotangent, kernel, taps
):
  assert slab_conv._input_gradient_by_taps(cotangent, kernel, 4) == taps
  if math.prod(cotangent) < 2e5:
    g, w = _normal(cotangent[:-1] + (8,)), _normal(kernel[:3] + (4, 8))
    jaxpr = str(jax.make_jaxpr(slab_conv._slab_dx)(w, g))
    assert ("conv_general_dilated" not in jaxpr) == slab_conv._input_gradient_by_taps(
      g.shape, w.shape, 4
    )


@pytest.mark.parametrize(
  "kernel,size,pads,slow",
  [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), True),  # LPIPS' last VGG block on 32² slices
    ((3, 3), (2, 2), ((0, 0), (0, 0)), False),  # nothing to fold into the conv
    ((3, 3), (3, 3), ((1, 1), (1, 1)), False),
    ((4, 4), (3, 8), ((1, 0), (0, 0)), True),
    ((4, 4), (8, 3), ((1, 1), (0, 0)), False),  # the axis the kernel outgrows is not padded
  ],
)
def test_padded_conv_is_slow_where_the_kernel_outgrows_a_padded_axis(kernel, size, pads, slow):
  assert slab_conv.padded_conv_is_slow(kernel, size, pads) == slow


@pytest.mark.parametrize("size,barrier", [(2, True), (8, False)])
def test_same_conv_of_a_tiny_input_keeps_its_padding_apart(size, barrier):
  """A zero-padded 3x3 conv of 2x2 inputs pads first, behind a barrier (not of 8x8 ones); the
  value and both gradients match lax either way."""
  x, w = _normal((2, size, size, 6), 11), _normal((3, 3, 6, 4), 12)
  ct = _normal((2, size, size, 4), 13)

  def same_conv(impl):
    return lambda x, w: layers.conv(x, w, (1, 1), ((1, 1), (1, 1)), impl=impl)

  outs = {impl: value_and_grads(same_conv(impl), x, w, ct) for impl in ("fast", "lax")}
  for fast, ref in zip(jax.tree.leaves(outs["fast"]), jax.tree.leaves(outs["lax"])):
    _assert_close(fast, ref)
  assert ("optimization_barrier" in str(jax.make_jaxpr(same_conv("fast"))(x, w))) == barrier


def test_zero_pad_pads_and_crops_the_spatial_axes():
  x = _normal((2, 4, 5, 3), 10)
  np.testing.assert_array_equal(
    slab_conv.zero_pad(x, ((1, 2), (0, 1))), jnp.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0)))
  )
  np.testing.assert_array_equal(
    slab_conv.zero_pad(x, ((-1, 0), (2, -3))),
    jnp.pad(x[:, 1:, :2], ((0, 0), (0, 0), (2, 0), (0, 0))),
  )


def test_edge_pad_value_and_gradient_match():
  x = _normal((2, 1, 4, 3, 2))
  widths = ((1, 1), (2, 0), (0, 3))
  ct = _normal((2, 3, 6, 6, 2), 1)
  outs = {
    impl: jax.value_and_grad(lambda x, i=impl: (layers.edge_pad(x, widths, impl=i) * ct).sum())(x)
    for impl in ("fast", "lax")
  }
  _assert_close(outs["fast"][0], outs["lax"][0])
  _assert_close(outs["fast"][1], outs["lax"][1])


def test_space_to_depth_round_trip():
  x = _normal((2, 4, 6, 2, 3))
  y = strided.space_to_depth(x, (2, 3, 1))
  assert y.shape == (2, 2, 2, 2, 18)
  np.testing.assert_array_equal(y[0, 1, 0, 1, 3 * 3 + 2], x[0, 2 + 1, 0 + 0, 1, 2])
  np.testing.assert_array_equal(strided.depth_to_space(y, (2, 3, 1)), x)


def test_impl_switch():
  assert layers.resolve_conv_impl() == "fast"
  with layers.use_conv_impl("lax"):
    assert layers.resolve_conv_impl("auto") == "lax"
    assert layers.resolve_conv_impl("fast") == "fast"  # an explicit choice wins
    with layers.use_conv_impl("fast"):
      assert layers.resolve_conv_impl() == "fast"
    assert layers.resolve_conv_impl() == "lax"
  assert layers.resolve_conv_impl() == "fast"
  with pytest.raises(ValueError, match="use_conv_impl"):
    with layers.use_conv_impl("auto"):
      pass
  with pytest.raises(ValueError, match="conv_impl 'eigen'"):
    layers.conv(jnp.ones((1, 4, 1)), jnp.ones((2, 1, 1)), (1,), ((0, 0),), impl="eigen")


def test_default_impl_follows_backend(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.resolve_conv_impl() == "lax"  # cuDNN's convolutions, not the CPU formulation
  with layers.use_conv_impl("fast"):
    assert layers.resolve_conv_impl() == "fast"
  assert layers.resolve_conv_impl() == "lax"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert layers.resolve_conv_impl() == "fast"


def _runs_slab_convs(module, x, impl=None):
  """Whether `module`'s traced forward pass holds the CPU formulation's custom VJP."""
  params = module.init(jax.random.PRNGKey(0), x)
  context = layers.use_conv_impl(impl) if impl else contextlib.nullcontext()
  with context:
    return "custom_vjp" in str(jax.make_jaxpr(module.apply)(params, x))


def test_module_field_picks_the_implementation():
  """A module's `conv_impl` decides its formulation, whatever `use_conv_impl` says around it;
  "auto" follows `use_conv_impl`."""
  x = jnp.ones((1, 4, 4, 4, 2))
  assert not _runs_slab_convs(layers.SamePadConv(3, conv_impl="lax"), x, impl="fast")
  assert _runs_slab_convs(layers.SamePadConv(3, conv_impl="fast"), x, impl="lax")
  assert _runs_slab_convs(layers.SamePadConv(3), x)
  assert not _runs_slab_convs(layers.SamePadConv(3), x, impl="lax")
  assert not _runs_slab_convs(layers.ResBlock(1, conv_impl="lax"), x, impl="fast")

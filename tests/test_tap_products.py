"""One-output-channel convolutions as matrix products over the taps, against `lax`."""

import jax
import jax.numpy as jnp
import pytest
from testing_arrays import assert_close, max_relative_error, normal, value_and_grads

from latentfm.nn.cpu import slab_conv, tap_products

CASES = [
  # input shape (B, *spatial, ci), kernel spatial shape, output channels
  ((2, 7, 6, 5, 4), (3, 3, 3), 1),  # the decoder's image output
  ((2, 8, 7, 6, 6), (4, 4, 4), 1),  # the 3D discriminator's logits
  ((1, 6, 3, 5, 3), (2, 3, 1), 1),  # uneven kernel
  ((3, 9, 8, 5), (4, 4), 1),  # the 2D discriminator's logits
  ((2, 9, 5), (3,), 1),
  ((2, 6, 5, 4, 3), (3, 2, 3), 3),  # any output width computes the same function
]


@pytest.mark.parametrize("shape,kernel_shape,co", CASES, ids=[str(c) for c in CASES])
def test_value_and_gradients_match_lax(shape, kernel_shape, co):
  x, w = normal(shape, 0), normal(kernel_shape + (shape[-1], co), 1)
  ct = normal(slab_conv.lax_valid(x, w).shape, 2)
  y, y_ref = tap_products.conv_valid(x, w), slab_conv.lax_valid(x, w)
  assert y.shape == y_ref.shape
  assert_close(y, y_ref)
  (_, (dx, dw)), (_, (dx_ref, dw_ref)) = (
    value_and_grads(f, x, w, ct) for f in (tap_products.conv_valid, slab_conv.lax_valid)
  )
  assert dx.shape == x.shape and dw.shape == w.shape
  assert_close(dx, dx_ref)
  assert_close(dw, dw_ref)


@pytest.mark.parametrize("co,uses_taps", [(1, True), (2, False)])
def test_fast_path_takes_tap_products_for_one_output_channel(co, uses_taps):
  """One output channel: matrix products only; two: the slab convolutions (slower as taps)."""
  jaxpr = str(
    jax.make_jaxpr(slab_conv.conv_valid)(normal((1, 6, 6, 6, 4)), normal((3, 3, 3, 4, co)))
  )
  assert ("conv_general_dilated" not in jaxpr) == uses_taps
  assert ("dot_general" in jaxpr) == uses_taps


def test_bfloat16_is_as_accurate_as_lax():
  """The tap sums run in float32: bfloat16 values and gradients are no further from the float32
  result than `lax`'s own bfloat16 convolution (summing the 27 taps in bfloat16 was 2.7x)."""
  x, w = normal((2, 10, 10, 10, 32), 3), normal((3, 3, 3, 32, 1), 4) / 30
  ct = normal((2, 8, 8, 8, 1), 5)

  def value_and_grads(conv, dtype):
    f = lambda x, w: (conv(x, w) * ct.astype(dtype)).sum().astype(jnp.float32)
    y = conv(x.astype(dtype), w.astype(dtype))
    return (y, *jax.grad(f, (0, 1))(x.astype(dtype), w.astype(dtype)))

  reference = value_and_grads(slab_conv.lax_valid, jnp.float32)
  error = lambda outs: [
    max_relative_error(a.astype(jnp.float32), b) for a, b in zip(outs, reference)
  ]
  taps = value_and_grads(tap_products.conv_valid, jnp.bfloat16)
  assert all(a.dtype == jnp.bfloat16 for a in taps)
  for e_taps, e_lax in zip(error(taps), error(value_and_grads(slab_conv.lax_valid, jnp.bfloat16))):
    assert e_taps <= 1.25 * e_lax + 1e-6


@pytest.mark.parametrize(
  "shape,kernel_shape,co",
  [
    ((2, 6, 6, 6, 5), (4, 4, 4), 7),  # a discriminator layer on few positions
    ((1, 5, 7, 4, 3), (3, 2, 3), 4),  # uneven kernel and sizes
    ((3, 6, 6, 5), (4, 4), 6),  # 2D
    ((2, 9, 4), (3,), 2),  # 1D
  ],
)
def test_input_gradient_matches_lax(shape, kernel_shape, co):
  x, w = normal(shape, 12), normal(kernel_shape + (shape[-1], co), 13)
  ct = normal(slab_conv.lax_valid(x, w).shape, 14)
  dx_ref = jax.vjp(lambda v: slab_conv.lax_valid(v, w), x)[1](ct)[0]
  dx = jax.jit(tap_products.input_gradient)(ct, w)
  assert dx.shape == x.shape and dx.dtype == jnp.float32
  assert_close(dx, dx_ref)
  assert tap_products.input_gradient(ct.astype(jnp.bfloat16), w).dtype == jnp.bfloat16

"""Replicate ("edge") padding of channels-last arrays with a memory-light gradient.

`edge_pad` gives the same values as `jnp.pad(x, ..., mode="edge")`. Its forward pass zero-pads
in one pass and then writes the thin border shells in place; its gradient crops the cotangent in
one pass and adds the folded border shells in place. Differentiating the concatenation of
broadcast edges instead costs several full passes per axis, which on a CPU is as slow as the
convolution that follows (bench/RESULTS.md, "CPU kernel choices", row "edge padding").
"""

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Widths = tuple[tuple[int, int], ...]


def _slice(x: Array, axis: int, start: int, stop: int) -> Array:
  return lax.slice_in_dim(x, start, stop, axis=axis)


def edge_pad_concat(x: Array, widths: Sequence[tuple[int, int]]) -> Array:
  """Edge padding as concatenated broadcast edges (plain autodiff; used on thin shells)."""
  for axis, (lo, hi) in enumerate(widths, start=1):
    if not (lo or hi):
      continue
    shape = lambda w, a=axis, s=x.shape: (*s[:a], w, *s[a + 1 :])
    x = jnp.concatenate(
      [
        jnp.broadcast_to(_slice(x, axis, 0, 1), shape(lo)),
        x,
        jnp.broadcast_to(_slice(x, axis, x.shape[axis] - 1, x.shape[axis]), shape(hi)),
      ],
      axis,
    )
  return x


def _fold_concat(g: Array, widths: Widths) -> Array:
  """Transpose of `edge_pad_concat` by autodiff: border planes summed into the kept ones."""
  shape = tuple(n - lo - hi for n, (lo, hi) in zip(g.shape[1:-1], widths))
  unpadded = jax.ShapeDtypeStruct((g.shape[0], *shape, g.shape[-1]), g.dtype)
  return jax.linear_transpose(lambda v: edge_pad_concat(v, widths), unpadded)(g)[0]


def _pad_in_place(x: Array, widths: Widths) -> Array:
  nd = len(widths)
  y = lax.pad(
    x, jnp.zeros((), x.dtype), ((0, 0, 0), *[(lo, hi, 0) for lo, hi in widths], (0, 0, 0))
  )
  for axis, (lo, hi) in enumerate(widths, start=1):
    n = x.shape[axis]
    others = tuple((0, 0) if a == axis else widths[a - 1] for a in range(1, nd + 1))
    for width, index, start in ((lo, 0, 0), (hi, n - 1, lo + n)):
      if width:
        face = edge_pad_concat(_slice(x, axis, index, index + 1), others)
        face = jnp.broadcast_to(face, (*face.shape[:axis], width, *face.shape[axis + 1 :]))
        y = lax.dynamic_update_slice_in_dim(y, face, start, axis)
  return y


def _fold_in_place(g: Array, widths: Widths) -> Array:
  """Gradient of `edge_pad`: the cropped cotangent, with each output border plane rewritten.

  Axis by axis, the border planes of the output are recomputed from the cotangent alone,
  restricted to the interior of the axes handled before and folded over the axes after, so that
  every update is independent of the others and XLA writes it in place.
  """
  nd = len(widths)
  out = g[(slice(None), *[slice(lo, g.shape[a + 1] - hi) for a, (lo, hi) in enumerate(widths)])]
  for axis, (lo, hi) in enumerate(widths, start=1):
    n = g.shape[axis]
    later = tuple(widths[a - 1] if a > axis else (0, 0) for a in range(1, nd + 1))
    start = [0] + [int(widths[a - 1][0] > 0) if a < axis else 0 for a in range(1, nd + 1)] + [0]
    for width, planes, index in ((lo, (0, lo + 1), 0), (hi, (n - hi - 1, n), out.shape[axis] - 1)):
      if not width:
        continue
      plane = jnp.sum(_slice(g, axis, *planes), axis, keepdims=True)
      for a in range(1, axis):  # earlier axes: interior only (their borders are done)
        a_lo, a_hi = widths[a - 1]
        plane = _slice(plane, a, a_lo + bool(a_lo), plane.shape[a] - a_hi - bool(a_hi))
      start[axis] = index
      out = lax.dynamic_update_slice(out, _fold_concat(plane, later), start)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _edge_pad(x: Array, widths: Widths) -> Array:
  return _pad_in_place(x, widths)


_edge_pad.defvjp(
  lambda x, widths: (_pad_in_place(x, widths), None),
  lambda widths, _, g: (_fold_in_place(g, widths),),
)


def edge_pad(x: Array, widths: Sequence[tuple[int, int]]) -> Array:
  """Replicate-pads the spatial axes of a channels-last `(B, *spatial, C)` array."""
  widths = tuple((int(lo), int(hi)) for lo, hi in widths)
  if len(widths) != x.ndim - 2 or any(lo < 0 or hi < 0 for lo, hi in widths):
    raise ValueError(f"edge_pad: need {x.ndim - 2} non-negative (lo, hi) widths, got {widths}")
  if not any(lo or hi for lo, hi in widths):
    return x
  if any((lo or hi) and n < 3 for n, (lo, hi) in zip(x.shape[1:-1], widths)):
    return edge_pad_concat(x, widths)  # border planes would overlap: plain autodiff
  return _edge_pad(x, widths)

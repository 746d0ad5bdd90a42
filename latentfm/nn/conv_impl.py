"""Which convolution implementation runs: "lax" (XLA's own convolutions) or "fast" (XLA:CPU's).

A module's `conv_impl` field (fed from a config's `model.conv_impl`) is one of `CONV_IMPLS`.
"auto", the default, is "fast" on the CPU and "lax" on accelerators; inside
`with use_conv_impl(...)` (for tests and benchmarks) "auto" means the implementation given
there. The choice is read when a function is traced, so a module built with "fast" or "lax"
always runs that implementation.
"""

from collections.abc import Iterator
import contextlib

import jax

CONV_IMPLS = ("auto", "fast", "lax")
_auto_override: list[str] = []  # innermost `use_conv_impl` last


def resolve_conv_impl(impl: str = "auto") -> str:
  """ "fast" or "lax" for a `conv_impl` value of `CONV_IMPLS`; a clear ValueError otherwise.

  "auto" is the implementation of the innermost `use_conv_impl`, else "fast" on the CPU and
  "lax" on accelerators (`jax.default_backend()`).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {impl!r}; choose one of {CONV_IMPLS}")
  if impl != "auto":
    return impl
  if _auto_override:
    return _auto_override[-1]
  return "fast" if jax.default_backend() == "cpu" else "lax"


@contextlib.contextmanager
def use_conv_impl(impl: str) -> Iterator[None]:
  """Makes "auto" mean `impl` ("fast" or "lax") for functions traced inside the block.

  For tests and benchmarks that compare the implementations on one module; code that runs a
  model picks its implementation with the module's `conv_impl` field instead.
  """
  if impl not in CONV_IMPLS[1:]:
    raise ValueError(f"use_conv_impl takes 'fast' or 'lax', got {impl!r}")
  _auto_override.append(impl)
  try:
    yield
  finally:
    _auto_override.pop()

"""XLA compiler options for every function the library compiles, and `jit` that applies them.

On the CPU, XLA hands some convolutions to its YNNPACK backend, which runs each one on a single
core; the weight-gradient convolutions of `latentfm.nn.layers` are among them and then dominate
a training step, several times slower than on XLA's own multi-core convolutions
(bench/RESULTS.md, "CPU kernel choices", row "compiler options"). Everything the library
compiles (training and evaluation steps, sampling, decoding, metrics, LPIPS) therefore keeps
YNNPACK for reductions only. Other backends compile with their defaults.

For your own functions of the library's models, use the same:

  from latentfm.train import compiler
  step = compiler.jit(my_step, donate_argnums=0)   # instead of jax.jit(my_step, ...)

`tests/test_compiler.py` fails if a library module compiles with plain `jax.jit`.
"""

from collections.abc import Callable
import functools
import logging
from typing import Any

import jax
from jax._src import core as jax_core  # trace_state_clean: is a call outside any trace?
import jax.numpy as jnp

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """Options for `jax.jit(..., compiler_options=...)`, or None (the backend's defaults).

  None off the CPU, and on an XLA that does not know the option (it is experimental): functions
  then compile with the defaults, slower on the CPU but identical in value. Starts the backend.
  """
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(jnp.float32(0)).compile()
  except Exception as err:  # pylint: disable=broad-except
    logging.warning("XLA rejected %s (%s); functions compile with the defaults", _CPU_OPTIONS, err)
    return None
  return dict(_CPU_OPTIONS)


class _Deferred:
  """A jitted function built on first use, so that importing a module that decorates with
  `jit` does not start the backend (e.g. before `bench.scaling` forces a device count).

  Called while an enclosing function is traced (inside another `jit`), it runs as a plain
  nested `jax.jit`: JAX takes compiler options only at the top level, and the enclosing
  compilation's options then apply. Attributes other than calling (`lower`, `trace`, ...) are
  those of the top-level function.
  """

  def __init__(self, fn: Callable[..., Any], build: Callable[[bool], Callable[..., Any]]):
    functools.update_wrapper(self, fn)
    self._build, self._built = build, {}

  def _jitted(self, top_level: bool = True) -> Callable[..., Any]:
    if top_level not in self._built:
      self._built[top_level] = self._build(top_level)
    return self._built[top_level]

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._jitted(jax_core.trace_state_clean())(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__") or name in ("_build", "_built"):
      raise AttributeError(name)
    return getattr(self._jitted(), name)


def jit(fn: Callable[..., Any] | None = None, /, **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)` compiled with `compiler_options()`.

  Also a decorator, bare (`@jit`) or with arguments (`@jit(static_argnames=("n",))`).
  Args:
    fn: the function to compile.
    **jit_kwargs: any other `jax.jit` argument (`static_argnums`, `donate_argnums`, ...).
  Returns:
    The jitted function (same call signature; `.lower(...)` etc. as `jax.jit`'s).
  """
  if fn is None:
    return functools.partial(jit, **jit_kwargs)
  return _Deferred(
    fn,
    lambda top_level: jax.jit(
      fn, compiler_options=compiler_options() if top_level else None, **jit_kwargs
    ),
  )


def filter_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`equinox.filter_jit(fn)` (array leaves traced, everything else static) compiled with
  `compiler_options()`; for functions that take callables, e.g. a velocity field."""
  import equinox as eqx  # pylint: disable=import-outside-toplevel

  return _Deferred(
    fn,
    lambda top_level: eqx.filter_jit(
      fn, compiler_options=compiler_options() if top_level else None
    ),
  )

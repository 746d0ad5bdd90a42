"""XLA compiler options for the jitted training steps.

On the CPU, XLA hands some convolutions to its YNNPACK backend, which runs each one on a single
core; the weight-gradient convolutions of `latentfm.nn.layers` are among them and then dominate
a training step (measured: the thesis autoencoder's forward+backward at 64³ took 5.9 s with
them on YNNPACK and 3.4 s on XLA's own two-core convolutions). The training steps therefore
keep YNNPACK for reductions only. Other backends compile with their defaults.
"""

from collections.abc import Callable
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """Options for `jax.jit(..., compiler_options=...)` of a training step, or None (defaults).

  None off the CPU, and on an XLA that does not know the option (it is experimental): the step
  then compiles with the defaults, slower on the CPU but identical in value.
  """
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(jnp.float32(0)).compile()
  except Exception as err:  # pylint: disable=broad-except
    logging.warning("XLA rejected %s (%s); training steps compile with the defaults",
                    _CPU_OPTIONS, err)
    return None
  return dict(_CPU_OPTIONS)


def jit_train_step(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)` compiled with `compiler_options()`."""
  return jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)

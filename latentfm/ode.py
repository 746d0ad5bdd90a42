"""ODE integration of a velocity field with Diffrax, counting the velocity evaluations made.

`integrate` solves dz/dt = v(z, t) between two times: fixed-step solvers (`euler`, `heun`,
`midpoint`) take `steps` equal steps; adaptive ones (`tsit5`, `dopri5`) use a PID step-size
controller and `steps` only sets the initial step.
"""

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp

from latentfm.train import compiler

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]


def _eager_fsal(cls: type) -> type:
  """A FSAL Runge-Kutta solver that evaluates f(t0, y0) once in `init`.

  Diffrax defers that evaluation to the first step and repeats it whenever the first step is
  rejected; doing it up front makes the cost exactly `1 + (stages - 1) * num_steps`.
  """

  class Eager(cls):
    def init(self, terms, t0, t1, y0, args):
      state = super().init(terms, t0, t1, y0, args)
      if state is None:
        return None
      return jnp.array(False), self.func(terms, t0, y0, args)

  Eager.__name__ = Eager.__qualname__ = cls.__name__
  return Eager


# name -> (solver class, adaptive)
_SOLVERS = {
  "euler": (diffrax.Euler, False),
  "heun": (diffrax.Heun, False),
  "midpoint": (diffrax.Midpoint, False),
  "tsit5": (_eager_fsal(diffrax.Tsit5), True),
  "dopri5": (_eager_fsal(diffrax.Dopri5), True),
}
SOLVERS = tuple(_SOLVERS)


def _evaluations_per_run(solver: Any, num_steps: Array) -> Array:
  """Velocity evaluations for `num_steps` attempted steps (accepted + rejected)."""
  tableau = getattr(solver, "tableau", None)
  if tableau is None:  # Euler
    return num_steps
  if tableau.fsal:
    return 1 + (tableau.num_stages - 1) * num_steps
  return tableau.num_stages * num_steps


@compiler.filter_jit
def _integrate(velocity_fn, z1, solver_name, steps, rtol, atol, t0, t1, max_steps):
  cls, adaptive = _SOLVERS[solver_name]
  solver = cls()
  if adaptive:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
  else:
    controller = diffrax.ConstantStepSize()
  term = diffrax.ODETerm(lambda t, z, args: velocity_fn(z, t))
  sol = diffrax.diffeqsolve(
    term,
    solver,
    t0=t0,
    t1=t1,
    dt0=(t1 - t0) / steps,
    y0=z1,
    stepsize_controller=controller,
    saveat=diffrax.SaveAt(t1=True),
    max_steps=max_steps,
  )
  return sol.ys[-1], _evaluations_per_run(solver, sol.stats["num_steps"])


def integrate(
  velocity_fn: VelocityFn,
  z1: Array,
  *,
  solver: str = "euler",
  steps: int = 50,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  t0: float = 1.0,
  t1: float = 0.0,
  max_steps: int = 4096,
) -> tuple[Array, Array]:
  """Integrates dz/dt = velocity_fn(z, t) from `t0` to `t1`.

  The solve is compiled once per velocity function (for a pytree such as
  `velocity_from_model`, per static part), solver, tolerances and input shape; new array leaves
  (e.g. new parameters) and a new `steps` reuse it.

  Args:
    velocity_fn: `fn(z, t)`: the whole batch (B, ...) and a scalar time in [0, 1] to
      velocities of z's shape.
    z1: (B, ...) the state at `t0`, e.g. N(0, I) noise (B, d, h, w, C) for sampling.
    solver: one of `SOLVERS`. Fixed-step solvers (`euler`, `heun`, `midpoint`) take `steps`
      steps of size (t1 - t0) / steps; adaptive ones (`tsit5`, `dopri5`) start from that step
      and adapt it with a PID controller.
    steps: in [1, max_steps].
    rtol, atol: positive relative and absolute tolerances of the adaptive solvers.
    t0, t1: start and end times, each in [0, 1]; the default 1 → 0 goes from noise to data.
    max_steps: the most steps an adaptive solve may take (accepted and rejected).
  Returns:
    `(z(t1), nfe)`: z(t1) of z1's shape and dtype, and nfe an int32 scalar counting the
    velocity evaluations made, rejected steps included.
  """
  if solver not in _SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
  if not 1 <= steps <= max_steps:
    raise ValueError(f"steps must be in [1, max_steps={max_steps}], got {steps}")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be positive, got {rtol} and {atol}")
  return _integrate(
    velocity_fn,
    z1,
    solver,
    jnp.asarray(steps, jnp.int32),
    float(rtol),
    float(atol),
    float(t0),
    float(t1),
    int(max_steps),
  )

"""Sampling from the latent flow: the public notebook API.

  models = load("runs/demo/flow")
  volumes, nfe = sample(jax.random.PRNGKey(0), models, 4, solver="tsit5")
  write_samples("samples/", volumes)

`integrate` solves dz/dt = v(z, t) from t = 1 (noise) to t = 0 (data). Fixed-step solvers
(`euler`, `heun`, `midpoint`) take `steps` equal steps; `euler` is thesis Algorithm 3 exactly.
Adaptive solvers (`tsit5`, `dopri5`) use a PID step-size controller and `steps` only sets the
initial step. Each returns the number of velocity evaluations actually made.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
from typing import Any

import diffrax
import equinox as eqx
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latentfm.flow import LatentStats, denormalize, normalize
from latentfm.nn.vqgan import from_model_range, to_model_range

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


@eqx.filter_jit
def _integrate(velocity_fn, z1, solver_name, steps, rtol, atol, t0, t1, max_steps):
  cls, adaptive = _SOLVERS[solver_name]
  solver = cls()
  if adaptive:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
  else:
    controller = diffrax.ConstantStepSize()
  term = diffrax.ODETerm(lambda t, z, args: velocity_fn(z, t))
  sol = diffrax.diffeqsolve(
      term, solver, t0=t0, t1=t1, dt0=(t1 - t0) / steps, y0=z1,
      stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  return sol.ys[-1], _evaluations_per_run(solver, sol.stats["num_steps"])


def integrate(velocity_fn: VelocityFn, z1: Array, *, solver: str = "euler", steps: int = 50,
              rtol: float = 1e-5, atol: float = 1e-5, t0: float = 1.0, t1: float = 0.0,
              max_steps: int = 4096) -> tuple[Array, Array]:
  """Integrates dz/dt = velocity_fn(z, t) from `t0` to `t1`; returns `(z(t1), nfe)`.

  `velocity_fn(z, t)` takes the whole batch and a scalar time. The solve is compiled once per
  velocity function (for a pytree such as `velocity_from_model`, per static part), solver,
  tolerances and input shape; new array leaves (e.g. new parameters) and a new `steps` reuse
  it. `solver` is one of `SOLVERS`: fixed-step solvers take `steps` steps of size
  (t1 - t0) / steps, adaptive ones start from that step and take at most `max_steps`.
  `nfe` (an int32 scalar) counts the velocity evaluations made, rejected steps included.
  """
  if solver not in _SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
  if not 1 <= steps <= max_steps:
    raise ValueError(f"steps must be in [1, max_steps={max_steps}], got {steps}")
  return _integrate(velocity_fn, z1, solver, jnp.asarray(steps, jnp.int32), float(rtol),
                    float(atol), float(t0), float(t1), int(max_steps))


@flax.struct.dataclass
class ModelVelocity:
  """`velocity_fn(z, t)` from a network `apply_fn(variables, z, t_batch, train=False)`.

  A pytree: `params` are traced leaves, `apply_fn` is static, so sampling with new parameters
  reuses the compiled integrator (keep using the same module object).
  """
  apply_fn: Callable[..., Array] = flax.struct.field(pytree_node=False)
  params: Any

  def __call__(self, z: Array, t: Array) -> Array:
    tb = jnp.full((z.shape[0],), t, jnp.float32)
    return self.apply_fn({"params": self.params}, z, tb, train=False)


def velocity_from_model(apply_fn: Callable[..., Array], params: Any) -> ModelVelocity:
  """Wraps e.g. `UNet3D(...).apply` and its `params` as `velocity_fn(z, t)` (t broadcast)."""
  return ModelVelocity(apply_fn=apply_fn, params=params)


# ----------------------------------------------------------------------------- trained models


@dataclasses.dataclass(frozen=True)
class Models:
  """A trained pipeline: the flow's EMA velocity field and the VQ-GAN that decodes its latents."""

  velocity: ModelVelocity
  vqgan: Any
  vqgan_variables: dict
  stats: LatentStats
  latent_shape: tuple[int, ...]
  flow_step: int
  vqgan_step: int


def load(workdir: str, vqgan_workdir: str | None = None) -> Models:
  """Loads a trained flow (EMA weights) and its VQ-GAN from their checkpoints.

  `workdir` is the flow stage's workdir; its config names the VQ-GAN workdir unless
  `vqgan_workdir` is given.
  """
  from latentfm.nn.unet3d import UNet3D  # pylint: disable=import-outside-toplevel
  from latentfm.train import flow_step, stages  # pylint: disable=import-outside-toplevel
  config = stages.load_config(workdir)
  vq_config, vq_model, vq_vars, vq_step = stages.restore_vqgan(
      vqgan_workdir or config.vqgan_workdir)
  meta = stages.read_extra(workdir)
  shape = tuple(int(s) for s in meta["latent_shape"])
  state, extra, step = stages.restore_latest(workdir, flow_step.create_state,
                                             jax.random.PRNGKey(0), config, shape)
  unet = UNet3D.from_config(config.model)
  return Models(velocity=velocity_from_model(unet.apply, state["ema_params"]), vqgan=vq_model,
                vqgan_variables=vq_vars, stats=LatentStats.from_dict(extra["latent_stats"]),
                latent_shape=shape, flow_step=step, vqgan_step=vq_step)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(model, variables, z, snap):
  if snap:
    z = model.apply(variables, z, method=lambda m, v: m.quantize(v)["quantized"])
  return from_model_range(model.apply(variables, z, method=model.decode))[..., 0]


def decode(models: Models, z0: Array, snap_to_codebook: bool = False) -> Array:
  """Normalised latents → volumes [N, D, H, W] in [0, 1] (optionally snapped to the codebook)."""
  z = denormalize(z0, models.stats)
  return _decode(models.vqgan, models.vqgan_variables, z, bool(snap_to_codebook))


def sample(key: Array, models: Models, num: int, *, solver: str = "euler", steps: int = 50,
           rtol: float = 1e-5, atol: float = 1e-5, snap_to_codebook: bool = False,
           batch_size: int = 8) -> tuple[np.ndarray, int]:
  """`num` synthetic volumes [num, D, H, W] in [0, 1] and the NFE per batch.

  Noise z1 ~ N(0, I) is integrated from t = 1 to t = 0 with `solver`, un-normalised and decoded.
  """
  if num < 1:
    raise ValueError(f"num must be positive, got {num}")
  out, nfe = [], 0
  for i, k in enumerate(jax.random.split(key, -(-num // batch_size))):
    n = min(batch_size, num - i * batch_size)
    z1 = jax.random.normal(k, (n,) + models.latent_shape)
    z0, used = integrate(models.velocity, z1, solver=solver, steps=steps, rtol=rtol, atol=atol)
    out.append(np.asarray(decode(models, z0, snap_to_codebook)))
    nfe = max(nfe, int(used))
  return np.concatenate(out), nfe


def encode_to_noise(models: Models, volumes: Array, *, solver: str = "tsit5", steps: int = 50,
                    rtol: float = 1e-5, atol: float = 1e-5) -> tuple[Array, Array]:
  """Inverts real volumes [N, D, H, W] in [0, 1]: encode, normalise, integrate t = 0 → 1."""
  x = to_model_range(jnp.asarray(volumes, jnp.float32)[..., None])
  z = models.vqgan.apply(models.vqgan_variables, x, method=models.vqgan.encode)
  return integrate(models.velocity, normalize(z, models.stats), solver=solver, steps=steps,
                   rtol=rtol, atol=atol, t0=0.0, t1=1.0)


def write_samples(directory: str, volumes: np.ndarray, *, spacing: float = 1.0,
                  prefix: str = "sample") -> list[str]:
  """Writes volumes [N, D, H, W] as NIfTI (`spacing` mm) plus one tri-planar PNG; returns paths."""
  from latentfm import viz  # pylint: disable=import-outside-toplevel
  from latentfm.data.io import write_volume  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, vol in enumerate(np.asarray(volumes)):
    path = os.path.join(directory, f"{prefix}_{i:04d}.nii.gz")
    write_volume(path, vol, spacing=(spacing,) * 3)
    paths.append(path)
  viz.save_triplanar(os.path.join(directory, f"{prefix}s.png"), volumes[:8],
                     [f"{prefix} {i}" for i in range(min(8, len(volumes)))])
  return paths

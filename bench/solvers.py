r"""Solver accuracy vs cost on a trained flow: error of each solver against a tight reference.

  python -m bench.solvers --workdir runs/demo/flow

The reference is tsit5 at rtol = atol = 1e-8 from the same noise. Errors are RMS over the
latent (normalised units); NFE = velocity evaluations per solve. The last line compares tsit5
with Euler-100 at equal error: the cheapest swept tolerance whose error is at most Euler-100's.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num", type=int, default=4)
  args = parser.parse_args()
  from latentfm import sample  # pylint: disable=import-outside-toplevel
  models = sample.load(args.workdir)
  z1 = jax.random.normal(jax.random.PRNGKey(0), (args.num,) + models.latent_shape)
  ref, ref_nfe = sample.integrate(models.velocity, z1, solver="tsit5", rtol=1e-8, atol=1e-8)
  rms = lambda z: float(jnp.sqrt(jnp.mean((z - ref) ** 2)))
  print(f"reference tsit5 rtol 1e-8: NFE {int(ref_nfe)}")
  print("| solver | setting | NFE | RMS error vs reference |")
  print("|---|---|---|---|")
  euler = {}
  for steps in (10, 25, 50, 100):
    z, nfe = sample.integrate(models.velocity, z1, solver="euler", steps=steps)
    euler[steps] = rms(z)
    print(f"| euler | {steps} steps | {int(nfe)} | {euler[steps]:.2e} |")
  for steps in (10, 25):
    z, nfe = sample.integrate(models.velocity, z1, solver="heun", steps=steps)
    print(f"| heun | {steps} steps | {int(nfe)} | {rms(z):.2e} |")
  adaptive = []
  for tol in TOLERANCES:
    z, nfe = sample.integrate(models.velocity, z1, solver="tsit5", rtol=tol, atol=tol)
    adaptive.append((tol, int(nfe), rms(z)))
    print(f"| tsit5 | rtol=atol={tol:g} | {int(nfe)} | {adaptive[-1][2]:.2e} |")
  matching = [a for a in adaptive if a[2] <= euler[100]]
  if matching:
    tol, nfe, err = min(matching, key=lambda a: a[1])
    print(f"equal error: tsit5 rtol=atol={tol:g} reaches {err:.2e} <= Euler-100's "
          f"{euler[100]:.2e} with {nfe} NFE (Euler: 100)")
  else:
    print(f"equal error: no swept tsit5 tolerance reaches Euler-100's {euler[100]:.2e}")


if __name__ == "__main__":
  main()

r"""Solver accuracy vs cost on a trained flow: error of each solver against a tight reference.

  python -m bench.solvers --workdir runs/demo/flow

The reference is tsit5 at rtol = atol = 1e-8 from the same noise. Errors are RMS over the
latent (normalised units); NFE = velocity evaluations per solve.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp


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
  for steps in (10, 25, 50, 100):
    z, nfe = sample.integrate(models.velocity, z1, solver="euler", steps=steps)
    print(f"| euler | {steps} steps | {int(nfe)} | {rms(z):.2e} |")
  for steps in (10, 25):
    z, nfe = sample.integrate(models.velocity, z1, solver="heun", steps=steps)
    print(f"| heun | {steps} steps | {int(nfe)} | {rms(z):.2e} |")
  for tol in (1e-2, 1e-3, 1e-4):
    z, nfe = sample.integrate(models.velocity, z1, solver="tsit5", rtol=tol, atol=tol)
    print(f"| tsit5 | rtol=atol={tol:g} | {int(nfe)} | {rms(z):.2e} |")


if __name__ == "__main__":
  main()

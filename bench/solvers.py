r"""Solver accuracy vs cost on a trained flow: error of each solver against a tight reference.

  python -m bench.solvers --workdir runs/demo/flow

The reference is tsit5 at rtol = atol = 1e-8 from the same noise. Errors are RMS over the
latent (normalised units); NFE = velocity evaluations per solve. The last line compares tsit5
with Euler-100 at equal error: the cheapest swept tolerance whose error is at most Euler-100's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from latentfm import sample

TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)


def reference(
  velocity: Callable[[jax.Array, jax.Array], jax.Array], z1: jax.Array
) -> tuple[jax.Array, int]:
  """`(z0, NFE)` of tsit5 at rtol = atol = 1e-8 from the noise `z1`: what the sweep is
  measured against."""
  z0, nfe = sample.integrate(velocity, z1, solver="tsit5", rtol=1e-8, atol=1e-8)
  return z0, int(nfe)


def sweep(
  velocity: Callable[[jax.Array, jax.Array], jax.Array],
  z1: jax.Array,
  ref: jax.Array,
  tolerances: Sequence[float] = TOLERANCES,
) -> Iterator[dict]:
  """Each solver's row as it finishes: solver, setting, NFE and RMS error against `ref` from
  the same noise `z1`. Euler 10-100 steps, Heun 10 and 25, tsit5 at each tolerance."""
  runs = (
    [("euler", f"{n} steps", {"steps": n}) for n in (10, 25, 50, 100)]
    + [("heun", f"{n} steps", {"steps": n}) for n in (10, 25)]
    + [("tsit5", f"rtol=atol={tol:g}", {"rtol": tol, "atol": tol}) for tol in tolerances]
  )
  for solver, setting, kwargs in runs:
    z, nfe = sample.integrate(velocity, z1, solver=solver, **kwargs)
    yield {
      "solver": solver,
      "setting": setting,
      "nfe": int(nfe),
      "error": float(jnp.sqrt(jnp.mean((z - ref) ** 2))),
    }


def equal_error(rows: Sequence[dict]) -> tuple[dict, dict | None]:
  """`(Euler-100's row, the cheapest tsit5 row whose error is at most its error)`, the second
  None if there is none."""
  euler_100 = next(r for r in rows if r["solver"] == "euler" and r["nfe"] == 100)
  matching = [r for r in rows if r["solver"] == "tsit5" and r["error"] <= euler_100["error"]]
  return euler_100, min(matching, key=lambda r: r["nfe"]) if matching else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num", type=int, default=4)
  args = parser.parse_args()
  models = sample.load(args.workdir)
  z1 = jax.random.normal(jax.random.PRNGKey(0), (args.num,) + models.latent_shape)
  ref, ref_nfe = reference(models.velocity, z1)
  print(f"reference tsit5 rtol 1e-8: NFE {ref_nfe}")
  print("| solver | setting | NFE | RMS error vs reference |")
  print("|---|---|---|---|")
  rows = []
  for r in sweep(models.velocity, z1, ref):
    rows.append(r)
    print(f"| {r['solver']} | {r['setting']} | {r['nfe']} | {r['error']:.2e} |", flush=True)
  euler_100, best = equal_error(rows)
  if best:
    print(
      f"equal error: tsit5 {best['setting']} reaches {best['error']:.2e} <= Euler-100's "
      f"{euler_100['error']:.2e} with {best['nfe']} NFE (Euler: 100)"
    )
  else:
    print(f"equal error: no swept tsit5 tolerance reaches Euler-100's {euler_100['error']:.2e}")


if __name__ == "__main__":
  main()

r"""Flow matching against the DDPM baseline: the same VQ-GAN latents, UNet, seeds and batch.

  python -m bench.fm_vs_ddpm --workdir runs/fm_vs_ddpm [--vqgan_workdir runs/demo/vqgan]
  python -m bench.fm_vs_ddpm --preset cpu64 --workdir runs/fm_vs_ddpm64   # 64³ volumes

Trains the flow configs `PRESET` (rectified flow) and `ddpm_PRESET` (the DDPM objective) on the
latents of one VQ-GAN (WORKDIR/vqgan, trained with the VQ-GAN config `PRESET` unless
--vqgan_workdir names a trained one), both unconditional as in the thesis' comparison. They
share the network, batch, seed (initial weights, data order), schedule of the learning rate and
the sampling noise; the DDPM's rate is lower (the flow's made it collapse). --objectives runs
one of them alone.

Every --eval_every steps the EMA weights generate --num_samples volumes (rectified flow:
Euler-50; DDPM: DDIM-50 at eta 1, the same NFE; at eta 0 DDIM carries the predictor's low-SNR
error to the output, `latentfm.ddpm`), scored by the pretrained-feature (2.5D VGG16) Fréchet
distance to the training volumes, over its floor (held-out real volumes in place of the
samples; 1 is the best a generator can expect), and by the morphometry W1 distances (CSF and
ventricle fractions, brain volume). Training time is wall clock from the start of each run
(latent encoding and compilation included) without the evaluations. At the end the last EMA
weights are scored against sampling NFE: Euler and tsit5 for flow matching, ancestral DDPM and
DDIM (eta 1) for the DDPM.

Prints the tables and writes WORKDIR/results.json, results.md and fm_vs_ddpm.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import json
import os
import sys
import time

OBJECTIVES = ("rectified_flow", "ddpm")
# DDIM at eta = 1: at eta = 0 the trained predictor's low-SNR error is carried to the output
# (`latentfm.ddpm`).
CURVE_SAMPLER = {
  "rectified_flow": ("euler", {"steps": 50}),
  "ddpm": ("ddim", {"steps": 50, "eta": 1.0}),
}
FM_SWEEP = [("euler", {"steps": n}) for n in (5, 10, 25, 50, 100)] + [
  ("tsit5", {"rtol": tol, "atol": tol}) for tol in (1e-2, 1e-3, 1e-4)
]
DDPM_SWEEP = [("ddim", {"steps": n, "eta": 1.0}) for n in (5, 10, 25, 50, 100)] + [("ddpm", {})]
COLUMNS = (
  "objective",
  "step",
  "train_seconds",
  "sampler",
  "nfe",
  "fd",
  "fd_ratio",
  "w1_csf_fraction",
  "w1_ventricle_fraction",
  "w1_brain",
)
MORPHOMETRY = ("csf_fraction", "ventricle_fraction", "brain")


class Scorer:
  """Quality of generated volumes against the training set, with the held-out floor.

  `extract` maps volumes (N, D, H, W) in [0, 1] to features (N, F); the training set's
  features and morphometry are computed once.
  """

  def __init__(self, train, held_out, extract: Callable):
    from latentfm.metrics.features import tissue_volumes  # pylint: disable=import-outside-toplevel

    self.extract = extract
    self.train_features = extract(train)
    self.train_morphometry = tissue_volumes(train)
    self.floor = self.fd(held_out)

  def fd(self, volumes) -> float:
    """Fréchet distance of `volumes`' features to the training set's."""
    from latentfm.metrics import generative  # pylint: disable=import-outside-toplevel

    return generative.frechet_distance(self.extract(volumes), self.train_features)

  def score(self, volumes) -> dict[str, float]:
    """`fd`, `fd_ratio` (to the floor) and `w1_<measure>` of `volumes`."""
    # pylint: disable=import-outside-toplevel
    from latentfm.metrics import generative
    from latentfm.metrics.features import tissue_volumes

    fd = self.fd(volumes)
    out = {"fd": fd, "fd_ratio": fd / self.floor}
    morphometry = tissue_volumes(volumes)
    for key in MORPHOMETRY:
      out[f"w1_{key}"] = generative.wasserstein_1(morphometry[key], self.train_morphometry[key])
    return out


def configs(preset: str, num_steps: int | None) -> dict:
  """`{objective: flow config}`: `flow.py:PRESET` and `flow.py:ddpm_PRESET`, unconditional,
  which differ only in objective, preview sampler and learning rate."""
  from experiments.configs import flow as flow_configs  # pylint: disable=import-outside-toplevel

  out = {}
  for objective in OBJECTIVES:
    c = flow_configs.get_config(preset if objective == "rectified_flow" else f"ddpm_{preset}")
    c.model.num_classes = 0  # unconditional, as the thesis' comparison
    if num_steps:
      c.train.num_steps = num_steps
    c.train.sample_every = 0  # the bench samples itself
    c.train.ckpt_every = c.train.num_steps
    c.train.tensorboard = False
    out[objective] = c
  return out


def quality(models, scorer: Scorer, num: int, seed: int, sampler: str, kwargs: dict) -> dict:
  """One sampler's row: the volumes from noise seed `seed`, their NFE and scores."""
  import jax  # pylint: disable=import-outside-toplevel

  from latentfm import sample  # pylint: disable=import-outside-toplevel

  volumes, nfe = sample.sample(jax.random.PRNGKey(seed), models, num, solver=sampler, **kwargs)
  setting = ", ".join(f"{k} {v:g}" for k, v in kwargs.items())
  return {
    "sampler": f"{sampler} ({setting})" if setting else sampler,
    "nfe": nfe,
    **scorer.score(volumes),
  }


def train_with_evaluation(
  config,
  workdir: str,
  scorer: Scorer,
  vqgan: tuple,
  num: int,
  eval_every: int,
  log: Callable[[dict], None],
) -> tuple[list, object]:
  """Trains `config` in `workdir`, scoring the EMA weights every `eval_every` steps.

  `vqgan` is `(model, variables, step)`. Returns `(rows, models at the last step)`.
  """
  # pylint: disable=import-outside-toplevel
  import jax

  from experiments import flow as flow_stage
  from latentfm import ddpm, sample
  from latentfm.nn.unet3d import UNet3D
  from latentfm.train import flow_step
  from latentfm.train.loop import Periodic

  objective = flow_step.objective(config)
  latents, _, stats, _ = flow_stage.prepare_latents(config, workdir, True)
  unet = UNet3D.from_config(config.model)  # one module: evaluations reuse the compiled sampler
  schedule = (
    ddpm.schedule_from_config(config.ddpm, float(abs(latents).max()))
    if objective == "ddpm"
    else None
  )
  rows, holder = [], {"eval_seconds": 0.0}

  def evaluate(step, state):
    jax.block_until_ready(state["ema_params"])
    train_seconds = time.perf_counter() - start - holder["eval_seconds"]
    begin = time.perf_counter()
    holder["models"] = sample.Models(
      velocity=sample.velocity_from_model(unet.apply, state["ema_params"]),
      vqgan=vqgan[0],
      vqgan_variables=vqgan[1],
      stats=stats,
      latent_shape=tuple(latents.shape[1:]),
      flow_step=step,
      vqgan_step=vqgan[2],
      objective=objective,
      schedule=schedule,
    )
    sampler, kwargs = CURVE_SAMPLER[objective]
    row = {
      "objective": objective,
      "step": step,
      "train_seconds": train_seconds,
      **quality(holder["models"], scorer, num, config.seed, sampler, kwargs),
    }
    rows.append(row)
    log(row)
    holder["eval_seconds"] += time.perf_counter() - begin
    return {"eval_fd_ratio": row["fd_ratio"]}

  start = time.perf_counter()
  flow_stage.train_and_evaluate(config, workdir, callbacks=[Periodic(eval_every, evaluate)])
  return rows, holder["models"]


def format_row(row: dict) -> str:
  """A Markdown table row of `COLUMNS` (missing entries blank)."""
  cells = []
  for key in COLUMNS:
    value = row.get(key, "")
    if isinstance(value, float):
      value = f"{value:.1f}" if key == "train_seconds" else f"{value:.4g}"
    cells.append(str(value))
  return "| " + " | ".join(cells) + " |"


def table(rows: Sequence[dict]) -> str:
  header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
  return "\n".join([header] + [format_row(r) for r in rows])


def plot(path: str, curve: Sequence[dict], sweep: Sequence[dict]) -> list[str]:
  """Three panels of FD / floor: against training steps, training time and sampling NFE.

  Returns: the labels of the training curves drawn, one per objective present in `curve`.
  """
  # pylint: disable=import-outside-toplevel
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
  drawn = []
  for objective, colour in zip(OBJECTIVES, ("tab:blue", "tab:red")):
    rows = [r for r in curve if r["objective"] == objective]
    if not rows:  # left out by --objectives: no empty legend entry
      continue
    sampler = CURVE_SAMPLER[objective][0]
    drawn.append(f"{objective} ({sampler}-50)")
    for ax, key in zip(axes[:2], ("step", "train_seconds")):
      ax.plot(
        [r[key] for r in rows], [r["fd_ratio"] for r in rows], "o-", color=colour, label=drawn[-1]
      )
    kinds = sorted({r["sampler"].split(" ")[0] for r in sweep if r["objective"] == objective})
    for kind, marker in zip(kinds, ("o-", "s--")):
      rows = sorted(
        (r for r in sweep if r["objective"] == objective and r["sampler"].split(" ")[0] == kind),
        key=lambda r: r["nfe"],
      )
      axes[2].plot(
        [r["nfe"] for r in rows],
        [r["fd_ratio"] for r in rows],
        marker,
        color=colour,
        label=f"{objective}: {kind}",
      )
  axes[0].set_xlabel("training step")
  axes[1].set_xlabel("training wall clock (s)")
  axes[2].set_xlabel("sampling NFE")
  axes[2].set_xscale("log")
  axes[0].set_ylabel("pretrained-feature FD / floor")
  for ax in axes:
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return drawn


def run(args) -> dict:
  """Trains, evaluates and writes the outputs (module docstring); returns the results."""
  runs = {o: os.path.join(args.workdir, o) for o in args.objectives}
  for path in runs.values():
    if os.path.exists(os.path.join(path, "ckpt")):
      raise ValueError(f"{path} already holds a run; give a new --workdir")
  # pylint: disable=import-outside-toplevel
  from experiments import vqgan as vqgan_stage
  from experiments.configs import vqgan as vqgan_configs
  from experiments.evaluate import feature_extractors
  from latentfm.data import loader
  from latentfm.train import stages

  vq_dir = args.vqgan_workdir or os.path.join(args.workdir, "vqgan")
  if not args.vqgan_workdir:
    print(f"== VQ-GAN ({args.preset} config) in {vq_dir}", flush=True)
    vqgan_stage.train_and_evaluate(vqgan_configs.get_config(args.preset), vq_dir)
  vq_config, vq_model, vq_vars, vq_step = stages.restore_vqgan(vq_dir)
  train, held_out = loader.load_splits(vq_config.data, vq_dir, vq_config.seed)
  num = args.num_samples or len(held_out.volumes)
  scorer = Scorer(train.volumes, held_out.volumes, feature_extractors()["vgg25d"])
  print(
    f"floor: pretrained-feature FD {scorer.floor:.4g} ({len(held_out.volumes)} held-out vs "
    f"{len(train.volumes)} training volumes); {num} samples per evaluation",
    flush=True,
  )
  print(table([]), flush=True)
  curve, sweep = [], []
  chosen = {o: c for o, c in configs(args.preset, args.num_steps).items() if o in args.objectives}
  for objective, config in chosen.items():
    config.vqgan_workdir = vq_dir
    rows, models = train_with_evaluation(
      config,
      runs[objective],
      scorer,
      (vq_model, vq_vars, vq_step),
      num,
      args.eval_every or config.train.num_steps // 4,
      lambda r: print(format_row(r), flush=True),
    )
    curve += rows
    for sampler, kwargs in DDPM_SWEEP if objective == "ddpm" else FM_SWEEP:
      row = {
        "objective": objective,
        "step": models.flow_step,
        **quality(models, scorer, num, config.seed, sampler, kwargs),
      }
      sweep.append(row)
      print(format_row(row), flush=True)
  results = {
    "preset": args.preset,
    "vqgan_workdir": vq_dir,
    "num_samples": num,
    "fd_floor": scorer.floor,
    "curve": curve,
    "nfe_sweep": sweep,
  }
  with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  markdown = (
    f"Pretrained-feature FD floor {scorer.floor:.4g}; {num} samples per row.\n\n"
    f"Quality against training:\n\n{table(curve)}\n\n"
    f"Quality against sampling NFE (last EMA weights):\n\n{table(sweep)}\n"
  )
  with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  plot(os.path.join(args.workdir, "fm_vs_ddpm.png"), curve, sweep)
  return results


def objective_list(text: str) -> tuple[str, ...]:
  """`"ddpm"` or `"rectified_flow,ddpm"` -> a tuple; argparse's error for other names."""
  names = tuple(n for n in text.split(",") if n)
  if not names or any(n not in OBJECTIVES for n in names):
    raise argparse.ArgumentTypeError(f"expected names from {','.join(OBJECTIVES)}, got {text!r}")
  return names


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument(
    "--vqgan_workdir",
    default=None,
    help="A trained VQ-GAN stage (default: train one in WORKDIR/vqgan).",
  )
  parser.add_argument("--preset", choices=("demo", "cpu64"), default="demo")
  parser.add_argument(
    "--num_steps",
    type=int,
    default=None,
    help="Training steps of each run (default: the preset's).",
  )
  parser.add_argument(
    "--eval_every",
    type=int,
    default=None,
    help="Steps between evaluations (default: a quarter of the run).",
  )
  parser.add_argument(
    "--objectives",
    type=objective_list,
    default=OBJECTIVES,
    help="Comma-separated subset of rectified_flow,ddpm (default both).",
  )
  parser.add_argument(
    "--num_samples",
    type=int,
    default=0,
    help="Volumes per evaluation (0: as many as held-out volumes).",
  )
  args = parser.parse_args(argv)
  for name in ("num_steps", "eval_every"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name} must be positive")
  if args.num_samples < 0 or args.num_samples == 1:
    parser.error("--num_samples must be 0 or at least 2 (a Fréchet distance needs 2 samples)")
  try:
    run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"fm_vs_ddpm: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()

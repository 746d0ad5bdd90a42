r"""Evaluates a trained pipeline: thesis metrics done per volume, distribution, diversity,
morphometry and memorisation, each next to its real-data floor.

  python -m experiments.evaluate --workdir runs/demo/flow [--num_samples N]

`--workdir` is a flow stage's workdir (its config names the VQ-GAN). Writes
`WORKDIR/eval/report.json`, `report.md`, `samples.png` and `distances.png`.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

from absl import flags
import numpy as np

from experiments import common


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained flow stage's workdir.")
  flags.DEFINE_integer("num_samples", 0, "Volumes to generate (0: as many as held-out volumes).")
  flags.DEFINE_string("samples", None, "Read these NIfTI samples instead of generating.")
  common.define_solver_flags()
  flags.DEFINE_integer("seed", 1234, "Sampling seed.")
  flags.DEFINE_integer("per_stage", 4, "Conditional flows: samples per stage and guidance weight.")
  flags.DEFINE_integer(
    "stage_samples",
    0,
    "Conditional flows: samples per stage of the per-stage morphometry (0: --per_stage).",
  )
  flags.DEFINE_float(
    "edit_guidance", None, "Conditional flows: guidance weight of the edits (sample.edit's)."
  )
  flags.DEFINE_float(
    "edit_strength",
    None,
    "Conditional flows: how far the edits invert, in (0, 1] (1: to noise; sample.edit's).",
  )
  flags.DEFINE_integer(
    "edit_subjects",
    0,
    "Conditional flows on the embedded cohort: held-out scans to edit to every stage (0: all).",
  )
  flags.DEFINE_float(
    "guidance",
    1.0,
    "Conditional flows: guidance weight of the per-stage "
    "morphometry (the sweep always has 0, 1, 2 and 4).",
  )


def _figures(out: str, samples: np.ndarray, report: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  from latentfm import viz  # pylint: disable=import-outside-toplevel

  viz.save_triplanar(
    os.path.join(out, "samples.png"),
    samples[:8],
    [f"sample {i}" for i in range(min(8, len(samples)))],
    title="generated",
  )
  mem = report["memorisation"]
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.hist(mem["held_out_to_train"], bins=15, alpha=0.6, label="held-out real → train")
  ax.hist(mem["generated_to_train"], bins=15, alpha=0.6, label="generated → train")
  ax.axvline(mem["voxel"]["privacy_threshold"], color="k", ls="--", lw=1, label="threshold")
  ax.set_xlabel("RMSE to the nearest training volume")
  ax.legend(fontsize=7)
  fig.tight_layout()
  from latentfm.atomic_write import atomic_path  # pylint: disable=import-outside-toplevel

  with atomic_path(os.path.join(out, "distances.png")) as partial:
    fig.savefig(partial, dpi=100)
  plt.close(fig)


def feature_extractors() -> dict:
  """The report's extractors, headline first: pretrained 2.5D VGG16, then random 3D convs."""
  # pylint: disable=import-outside-toplevel
  from latentfm.metrics.features import random_conv_features
  from latentfm.metrics.vgg_features import vgg25d_features

  return {"vgg25d": vgg25d_features(), "random": random_conv_features(seed=0)}


def run(
  workdir: str,
  *,
  num_samples: int = 0,
  samples_dir: str | None = None,
  solver: str | None = None,
  steps: int = 50,
  seed: int = 1234,
  per_stage: int = 4,
  guidance: float = 1.0,
  eta: float = 0.0,
  edit_subjects: int = 0,
  stage_samples: int = 0,
  edit_guidance: float | None = None,
  edit_strength: float | None = None,
) -> str:
  """Evaluates the flow in `workdir` (holding its lock): writes `workdir/eval/report.{json,md}`
  and figures; returns the Markdown report.

  `solver` None picks the objective's default (`sample.default_solver`); `eta` is DDIM's.
  """
  common.check_writable(workdir)
  with common.workdir_held(workdir, "evaluation"):
    return _evaluate(
      workdir,
      num_samples,
      samples_dir,
      solver,
      steps,
      seed,
      per_stage,
      guidance,
      eta,
      edit_subjects,
      stage_samples,
      edit_guidance,
      edit_strength,
    )


def _evaluate(
  workdir: str,
  num_samples: int,
  samples_dir: str | None,
  solver: str | None,
  steps: int,
  seed: int,
  per_stage: int,
  guidance: float,
  eta: float,
  edit_subjects: int = 0,
  stage_samples: int = 0,
  edit_guidance: float | None = None,
  edit_strength: float | None = None,
) -> str:
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp

  from latentfm import atomic_write, sample
  from latentfm.data import loader
  from latentfm.data.io import read_volume
  from latentfm.metrics import report as report_lib
  from latentfm.metrics.artifacts import decoder_periods
  from latentfm.nn.vqgan import from_model_range, to_model_range
  from latentfm.train import stages

  models = sample.load(workdir)
  solver = solver or sample.default_solver(models.objective)
  sample.check_solver(models.objective, solver)
  vq_dir = stages.load_stage_config(workdir, "flow").vqgan_workdir
  vq_config = stages.load_config(vq_dir)
  train, val = loader.load_splits(vq_config.data, vq_dir, vq_config.seed)
  sampling = {}
  if samples_dir:
    paths = sorted(glob.glob(os.path.join(samples_dir, "*.nii*")))
    if not paths:
      raise ValueError(f"{samples_dir}: no NIfTI samples")
    samples = np.stack([read_volume(p).array for p in paths])
    if samples.shape[1:] != val.volumes.shape[1:]:
      raise ValueError(
        f"{samples_dir}: samples of shape {samples.shape[1:]}, data {val.volumes.shape[1:]}"
      )
  else:
    start = time.perf_counter()
    num = num_samples or len(val.volumes)
    # A conditional flow is asked for the training data's stages in their proportions.
    labels = np.random.default_rng(seed).choice(train.labels, num) if models.num_classes else None
    samples, nfe = sample.sample(
      jax.random.PRNGKey(seed), models, num, labels=labels, solver=solver, steps=steps, eta=eta
    )
    sampling = {
      "objective": models.objective,
      "solver": solver,
      "steps": steps,
      "eta": eta,
      "nfe": nfe,
      "seconds_including_compile": time.perf_counter() - start,
    }
  x = to_model_range(jnp.asarray(val.volumes[..., None]))
  recon = from_model_range(models.vqgan.apply(models.vqgan_variables, x)["recon"])
  recon = np.asarray(recon)[..., 0]
  extractors = {k: report_lib.once_per_set(f) for k, f in feature_extractors().items()}
  report = report_lib.evaluate(samples, train.volumes, val.volumes, extractors)
  report["reconstruction"] = report_lib.reconstruction_metrics(
    recon, val.volumes, decoder_periods(vq_config.model.downsample)
  )
  report["sampling"] = sampling
  report["checkpoints"] = {"flow_step": models.flow_step, "vqgan_step": models.vqgan_step}
  if models.geometry is not None:
    report["geometry"] = models.geometry.to_dict()
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  if models.num_classes:
    from experiments import stage_eval

    report["stages"] = stage_eval.run(
      models,
      jax.random.PRNGKey(seed + 1),
      train,
      val,
      vq_dir,
      vq_config.data.shape,
      extractors["vgg25d"],
      out,
      per_stage=per_stage,
      guidance=guidance,
      solver=solver,
      steps=steps,
      edit_subjects=edit_subjects,
      stage_samples=stage_samples,
      edit_guidance=edit_guidance,
      edit_strength=edit_strength,
    )
  atomic_write.write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1))
  markdown = report_lib.to_markdown(report)
  if "stages" in report:
    markdown += "\n" + stage_eval.to_markdown(report["stages"])
  atomic_write.write_text(os.path.join(out, "report.md"), markdown)
  _figures(out, samples, report)
  return markdown


def main(argv: list[str]) -> None:
  define_flags()
  f = common.parse_plain_flags(argv)
  if not f.workdir:
    common.fail("--workdir is required")
  common.run_guarded(
    lambda: print(
      run(
        f.workdir,
        num_samples=f.num_samples,
        samples_dir=f.samples,
        solver=f.solver,
        steps=f.steps,
        seed=f.seed,
        per_stage=f.per_stage,
        guidance=f.guidance,
        eta=f.eta,
        edit_subjects=f.edit_subjects,
        stage_samples=f.stage_samples,
        edit_guidance=f.edit_guidance,
        edit_strength=f.edit_strength,
      )
    )
  )


if __name__ == "__main__":
  main(sys.argv)

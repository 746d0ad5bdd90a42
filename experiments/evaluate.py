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
  flags.DEFINE_enum("solver", "euler", ["euler", "heun", "midpoint", "tsit5", "dopri5"],
                    "ODE solver.")
  flags.DEFINE_integer("steps", 50, "Solver steps.")
  flags.DEFINE_integer("seed", 1234, "Sampling seed.")


def _figures(out: str, samples: np.ndarray, report: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from latentfm import viz  # pylint: disable=import-outside-toplevel
  viz.save_triplanar(os.path.join(out, "samples.png"), samples[:8],
                     [f"sample {i}" for i in range(min(8, len(samples)))], title="generated")
  mem = report["memorisation"]
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.hist(mem["held_out_to_train"], bins=15, alpha=0.6, label="held-out real → train")
  ax.hist(mem["generated_to_train"], bins=15, alpha=0.6, label="generated → train")
  ax.axvline(mem["voxel"]["privacy_threshold"], color="k", ls="--", lw=1, label="threshold")
  ax.set_xlabel("RMSE to the nearest training volume")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "distances.png"), dpi=100)
  plt.close(fig)


def feature_extractors() -> dict:
  """The report's extractors, headline first: pretrained 2.5D VGG16, then random 3D convs."""
  # pylint: disable=import-outside-toplevel
  from latentfm.metrics.features import random_conv_features
  from latentfm.metrics.vgg_features import vgg25d_features
  return {"vgg25d": vgg25d_features(), "random": random_conv_features(seed=0)}


def run(workdir: str, num_samples: int, samples_dir: str | None, solver: str, steps: int,
        seed: int) -> str:
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from latentfm import sample
  from latentfm.data import loader
  from latentfm.data.io import read_volume
  from latentfm.metrics import report as report_lib
  from latentfm.metrics.artifacts import decoder_periods
  from latentfm.nn.vqgan import from_model_range, to_model_range
  from latentfm.train import stages
  models = sample.load(workdir)
  vq_dir = stages.load_config(workdir).vqgan_workdir
  vq_config = stages.load_config(vq_dir)
  train, val = loader.load_splits(vq_config.data, vq_dir, vq_config.seed)
  sampling = {}
  if samples_dir:
    paths = sorted(glob.glob(os.path.join(samples_dir, "*.nii*")))
    if not paths:
      raise ValueError(f"{samples_dir}: no NIfTI samples")
    samples = np.stack([read_volume(p).array for p in paths])
    if samples.shape[1:] != val.volumes.shape[1:]:
      raise ValueError(f"{samples_dir}: samples of shape {samples.shape[1:]}, data "
                       f"{val.volumes.shape[1:]}")
  else:
    start = time.perf_counter()
    samples, nfe = sample.sample(jax.random.PRNGKey(seed), models, num_samples or len(val.volumes),
                                 solver=solver, steps=steps)
    sampling = {"solver": solver, "steps": steps, "nfe": nfe,
                "seconds_including_compile": time.perf_counter() - start}
  x = to_model_range(jnp.asarray(val.volumes[..., None]))
  recon = from_model_range(models.vqgan.apply(models.vqgan_variables, x)["recon"])
  recon = np.asarray(recon)[..., 0]
  report = report_lib.evaluate(samples, train.volumes, val.volumes, feature_extractors())
  report["reconstruction"] = report_lib.reconstruction_metrics(
      recon, val.volumes, decoder_periods(vq_config.model.downsample))
  report["sampling"] = sampling
  report["checkpoints"] = {"flow_step": models.flow_step, "vqgan_step": models.vqgan_step}
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  markdown = report_lib.to_markdown(report)
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  _figures(out, samples, report)
  return markdown


def main(argv: list[str]) -> None:
  define_flags()
  f = common.parse_plain_flags(argv)
  if not f.workdir:
    common.fail("--workdir is required")
  common.run_guarded(lambda: print(run(f.workdir, f.num_samples, f.samples, f.solver, f.steps,
                                       f.seed)))


if __name__ == "__main__":
  main(sys.argv)

r"""Does a class-conditional flow generate the stage it is asked for? Many samples per stage.

  python -m bench.stage_control --workdir runs/demo/flow --per_stage 8 --guidance 1,3

For each guidance weight: the mean ventricle and CSF fractions of `per_stage` samples asked for
each stage, next to the real volumes' (training and held-out together), and the accuracy of the
stage classifier of `latentfm.metrics.stages` (fitted on all real volumes) on the samples. The
evaluation report's per-stage section uses a few samples per stage, too few to rank stages whose
means differ by a fraction of their spread; this measures the same with more.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from latentfm import sample
from latentfm.data import loader
from latentfm.metrics import stages
from latentfm.metrics.features import tissue_volumes
from latentfm.train import stages as stage_io


def real_volumes(flow_dir: str, reference: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Real volumes `[N, D, H, W]` in [0, 1] and their stages int `(N,)`.

  Args:
    flow_dir: a trained flow stage.
    reference: 0: its VQ-GAN's training and held-out splits together; N > 0: N subjects of a
      balanced embedded cohort with another seed, on the same grid (written to
      `flow_dir/stage_reference_N`), for flows trained on a cohort that lacks some stages.
  """
  vq_dir = stage_io.load_stage_config(flow_dir, "flow").vqgan_workdir
  vq_config = stage_io.load_stage_config(vq_dir, "vqgan")
  data, workdir, seed = vq_config.data, vq_dir, vq_config.seed
  if reference > 0:
    if data.dir:
      raise SystemExit(
        f"--reference needs a flow trained on the embedded cohort; {vq_dir} read {data.dir}"
      )
    data = data.copy_and_resolve_references()
    data.cohort_size, data.stage_proportions = int(reference), None
    workdir, seed = os.path.join(flow_dir, f"stage_reference_{reference}"), seed + 1
  train, held_out = loader.load_splits(data, workdir, seed)
  volumes = np.concatenate([train.volumes, held_out.volumes])
  return volumes, np.concatenate([train.labels, held_out.labels]).astype(np.int32)


def stage_means(volumes: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, list]:
  """Mean CSF and ventricle fraction per class.

  Args: volumes `[N, D, H, W]` in [0, 1]; labels int `(N,)` in [0, num_classes).
  Returns: {"csf_fraction": [num_classes floats], "ventricle_fraction": [...]}.
  """
  m = tissue_volumes(volumes)
  return {
    k: [float(np.mean(m[k][labels == c])) for c in range(num_classes)] for k in stages.MEASURES
  }


def _row(name: str, means: dict[str, list], accuracy: str, seconds: str) -> str:
  fmt = lambda values, digits: " / ".join(f"{v:.{digits}f}" for v in values)
  vent, csf = means["ventricle_fraction"], means["csf_fraction"]
  ordered = "yes" if all(a < b for a, b in zip(vent, vent[1:])) else "no"
  return f"| {name} | {fmt(vent, 4)} | {ordered} | {fmt(csf, 3)} | {accuracy} | {seconds} |"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A trained class-conditional flow stage.")
  parser.add_argument("--per_stage", type=int, default=8, help="Samples per stage and weight.")
  parser.add_argument("--guidance", default="1,3", help="Comma-separated guidance weights.")
  parser.add_argument("--solver", default="euler")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--seed", type=int, default=7)
  parser.add_argument(
    "--reference",
    type=int,
    default=0,
    help="Compare with N subjects of a balanced embedded cohort instead of the flow's own data "
    "(for a flow trained on stage proportions).",
  )
  args = parser.parse_args(argv)

  models = sample.load(args.workdir)
  k = models.num_classes
  if k < 1:
    raise SystemExit(f"{args.workdir}: the flow is unconditional (model.num_classes 0)")
  volumes, labels = real_volumes(args.workdir, args.reference)
  features = stages.stage_features(volumes)
  accuracy = stages.cross_validated_accuracy(features, labels)
  classifier = stages.fit_classifier(features, labels)
  print(
    "| volumes | ventricle fraction per stage | rising | CSF fraction per stage "
    "| classifier accuracy | s |\n|---|---|---|---|---|---|"
  )
  print(_row("real", stage_means(volumes, labels, k), f"{accuracy:.2f} (5-fold CV)", "–"))
  chance = stages.ordered_chance(
    tissue_volumes(volumes)["ventricle_fraction"], labels, args.per_stage
  )
  print(f"| real, {args.per_stage} per stage: ventricle means rising in {chance:.0%} of draws |")
  asked = np.repeat(np.arange(k, dtype=np.int32), args.per_stage)
  for w in (float(x) for x in args.guidance.split(",")):
    start = time.perf_counter()
    generated, _ = sample.sample(
      jax.random.PRNGKey(args.seed),
      models,
      len(asked),
      labels=asked,
      guidance=w,
      solver=args.solver,
      steps=args.steps,
    )
    generated = np.asarray(generated)
    hits = classifier.predict(stages.stage_features(generated)) == asked
    seconds = f"{time.perf_counter() - start:.0f}"
    print(
      _row(f"samples, w = {w:g}", stage_means(generated, asked, k), f"{hits.mean():.2f}", seconds),
      flush=True,
    )


if __name__ == "__main__":
  main()

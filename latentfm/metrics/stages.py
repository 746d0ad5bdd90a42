"""Per-class evaluation of a class-conditional generator: morphometry per requested stage, a
stage classifier trained on real volumes, and counterfactual edits scored against the truth.

The classifier is a logistic regression on morphometry: the CSF and ventricle fractions and the
CSF fraction of the brain deeper than several relative depths. Atrophy enlarges the ventricles
and widens the sulci, so the deep-CSF profile carries the stage; at 32³ the pretrained slice
features of `vgg_features` separated the cohort's stages no better than chance plus a little,
so they are not used.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from latentfm.metrics import generative, image
from latentfm.metrics.features import as_volumes, otsu_threshold, tissue_volumes

DEPTHS = (0.2, 0.3, 0.4, 0.5, 0.6)
MEASURES = ("csf_fraction", "ventricle_fraction")


def deep_csf_profile(volumes, depths=DEPTHS, brain_threshold: float = 0.05) -> np.ndarray:
  """CSF fraction of the brain deeper than each relative depth (distance to the brain surface
  over its maximum), with CSF split from tissue by Otsu's threshold as in `tissue_volumes`.

  Args:
    volumes: `[N, D, H, W]` in [0, 1].
    depths: relative depths in [0, 1).
    brain_threshold: the intensity above which a voxel is brain (holes filled).
  Returns:
    float64 `[N, len(depths)]` in [0, 1] (0 for a volume with no brain).
  """
  rows = []
  for vol in as_volumes(volumes):
    brain = ndi.binary_fill_holes(vol > brain_threshold)
    if brain.sum() < 2:
      rows.append([0.0] * len(depths))
      continue
    csf = brain & (vol < otsu_threshold(vol[brain]))
    depth = ndi.distance_transform_edt(brain)
    depth = depth / depth.max()
    rows.append([(csf & (depth > d)).sum() / max((depth > d).sum(), 1) for d in depths])
  return np.asarray(rows, np.float64)


def stage_features(volumes) -> np.ndarray:
  """The classifier's inputs: CSF and ventricle fractions, then `deep_csf_profile`.

  Args:
    volumes: `[N, D, H, W]` in [0, 1].
  Returns:
    float64 `[N, 2 + len(DEPTHS)]`, every value a fraction in [0, 1].
  """
  m = tissue_volumes(volumes)
  return np.concatenate([np.stack([m[k] for k in MEASURES], 1), deep_csf_profile(volumes)], 1)


def _classifier():
  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def cross_validated_accuracy(
  features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0
) -> float:
  """Stratified k-fold accuracy of the stage classifier on real volumes (each fold held out
  once). `folds` is lowered to the smallest class count (at least 2).

  Args: features `(N, F)` from `stage_features`, labels int `(N,)` >= 0.
  Returns: the mean held-out accuracy, a float in [0, 1].
  """
  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import StratifiedKFold, cross_val_score

  labels = np.asarray(labels)
  counts = np.bincount(labels)
  folds = max(2, min(folds, int(counts[counts > 0].min())))
  cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
  return float(cross_val_score(_classifier(), features, labels, cv=cv).mean())


def fit_classifier(features: np.ndarray, labels: np.ndarray):
  """The stage classifier fitted on all given real volumes; `.predict(features)` -> labels.

  Args: features `(N, F)`, labels int `(N,)`. Returns: a fitted sklearn pipeline.
  """
  return _classifier().fit(features, np.asarray(labels))


def mean_ci(values: np.ndarray) -> dict:
  """Mean with a 95% bootstrap interval (NaN bounds below 2 values).

  Args: values `(N,)`. Returns: {"mean", "ci95": [low, high], "n"}.
  """
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return {
      "mean": float(values.mean()) if len(values) else float("nan"),
      "ci95": [float("nan"), float("nan")],
      "n": int(len(values)),
    }
  low, high = generative.bootstrap_ci(values, num_resamples=1000, seed=0)
  return {"mean": float(values.mean()), "ci95": [float(low), float(high)], "n": int(len(values))}


def per_stage_morphometry(
  samples: np.ndarray, sample_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray
) -> dict:
  """For each requested stage: generated vs real CSF and ventricle fractions (means with 95%
  bootstrap intervals) and their Wasserstein-1 distance.

  Args:
    samples: `[N, D, H, W]` generated volumes in [0, 1].
    sample_labels: int `(N,)`, the stage each was sampled for.
    real: `[M, D, H, W]` real volumes in [0, 1].
    real_labels: int `(M,)`, their stages.
  Returns:
    `{stage: {measure: {"model", "real", "w1"}}}` for each stage in `sample_labels` and each
    of `MEASURES`: `mean_ci` of the generated and the real fractions (in [0, 1]) and their
    Wasserstein-1 distance (>= 0; None when no real volume has that stage).
  """
  ms, mr = tissue_volumes(samples), tissue_volumes(real)
  out = {}
  for stage in sorted(set(np.asarray(sample_labels).tolist())):
    gen, ref = np.asarray(sample_labels) == stage, np.asarray(real_labels) == stage
    out[int(stage)] = {
      k: {
        "model": mean_ci(ms[k][gen]),
        "real": mean_ci(mr[k][ref]),
        "w1": generative.wasserstein_1(ms[k][gen], mr[k][ref]) if ref.any() else None,
      }
      for k in MEASURES
    }
  return out


def ordered_like(per_stage: dict, measure: str) -> bool:
  """Whether the generated stage means of `measure` have the same order as the real ones.

  Args: per_stage: from `per_stage_morphometry`; measure: one of `MEASURES`. Returns: a bool.
  """
  stages = [s for s in per_stage if per_stage[s][measure]["real"]["n"] > 0]
  model = [per_stage[s][measure]["model"]["mean"] for s in stages]
  real = [per_stage[s][measure]["real"]["mean"] for s in stages]
  return bool(np.array_equal(np.argsort(model), np.argsort(real)))


def ordered_chance(
  values: np.ndarray, labels: np.ndarray, per_stage: int, draws: int = 2000, seed: int = 0
) -> float:
  """How often `per_stage` real values per stage, drawn with replacement, have stage means in
  the order of the full set's: what the `ordered_like` check of that many samples per stage can
  show at best. Stages whose spreads overlap make it a coin toss with few samples.

  Args: values `(N,)` of one measure of real volumes; labels int `(N,)`; per_stage >= 1.
  Returns: the fraction of draws in [0, 1].
  """
  values, labels = np.asarray(values, np.float64), np.asarray(labels)
  stages = sorted(set(labels.tolist()))
  target = np.argsort([values[labels == s].mean() for s in stages])
  rng = np.random.default_rng(seed)
  means = np.stack(
    [rng.choice(values[labels == s], (draws, per_stage)).mean(axis=1) for s in stages], axis=1
  )
  return float(np.mean(np.all(np.argsort(means, axis=1) == target, axis=1)))


def edit_metrics(edited: np.ndarray, source: np.ndarray, truth: np.ndarray) -> dict:
  """Counterfactual edits against the true counterfactual (same subject, target stage).

  Args: edited, source (the unedited scans), truth: `[N, D, H, W]` in [0, 1].
  Returns: PSNR/SSIM of the edit vs the truth and of the unedited scan vs the truth (the
  baseline), each a mean with interval; the ventricle-fraction shift of edit and truth; and
  `shift_gain`, the least-squares slope of the edits' shifts on the true shifts (edits go both
  ways, so mean shifts cancel; 1: the true change, 0: none, < 0: the wrong way).
  """
  out = {}
  for name, fn in (("psnr", image.psnr), ("ssim", image.ssim)):
    out[name] = {
      "edit": mean_ci(np.asarray(fn(edited, truth))),
      "unedited": mean_ci(np.asarray(fn(source, truth))),
    }
  v = {
    k: tissue_volumes(x)["ventricle_fraction"]
    for k, x in (("edit", edited), ("source", source), ("truth", truth))
  }
  out["ventricle_shift"] = {
    "edit": mean_ci(v["edit"] - v["source"]),
    "truth": mean_ci(v["truth"] - v["source"]),
  }
  true_shift = v["truth"] - v["source"]
  out["shift_gain"] = float(
    np.sum((v["edit"] - v["source"]) * true_shift) / max(np.sum(true_shift**2), 1e-30)
  )
  return out

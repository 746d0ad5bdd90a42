"""The per-stage part of the evaluation report, for a class-conditional flow.

Called by `experiments.evaluate` when the flow has `model.num_classes > 0`:
- a stage classifier trained on the real volumes (cross-validated accuracy);
- a guidance sweep: balanced samples per weight w, scored by the classifier (accuracy on the
  requested stage) and by the headline Fréchet distance, as a table and `guidance.png`;
- per-stage morphometry of the samples at `guidance` against the real volumes of each stage;
- on the embedded cohort, whose subjects can be regenerated at any stage: counterfactual edits
  of the held-out scans to every other stage, scored against the true counterfactual, the
  inversion round trip, and `editing.png` (one subject, stages 0-3, edit beside truth).
  Editing inverts scans through the flow's ODE, so a DDPM model's report has no editing part.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from experiments import stage_figures
from latentfm.metrics import generative
from latentfm.metrics import stages as stage_metrics
from latentfm.metrics.features import tissue_volumes


def _present(labels: np.ndarray, num_classes: int) -> list[int]:
  return [s for s in range(num_classes) if (labels == s).any()]


def guidance_sweep(
  models,
  key,
  classes: list[int],
  per_stage: int,
  guidances,
  classifier,
  extract,
  train_features,
  solver: str,
  steps: int,
) -> tuple[list, dict]:
  """Per weight: balanced samples of `classes`, the classifier's accuracy on them and their
  Fréchet distance to the training set. Returns (rows, {w: (samples, labels)})."""
  # pylint: disable=import-outside-toplevel
  import jax

  from latentfm import sample

  labels = np.repeat(np.asarray(classes, np.int32), per_stage)
  rows, kept = [], {}
  for w in guidances:
    volumes, nfe = sample.sample(
      key, models, len(labels), labels=labels, guidance=float(w), solver=solver, steps=steps
    )
    predicted = classifier.predict(stage_metrics.stage_features(volumes))
    rows.append(
      {
        "guidance": float(w),
        "accuracy": float(np.mean(predicted == labels)),
        "fd": generative.frechet_distance(extract(volumes), train_features),
        "nfe": int(nfe),
      }
    )
    kept[float(w)] = (volumes, labels)
    key = jax.random.fold_in(key, 1)
  return rows, kept


def cohort_seeds(vq_dir: str, names) -> np.ndarray | None:
  """The generating seed of each named scan of an embedded cohort, or None for user data."""
  manifest = os.path.join(vq_dir, "cohort", "manifest.csv")
  if not os.path.isfile(manifest):
    return None
  with open(manifest, newline="", encoding="utf-8") as f:
    seeds = {row["file"]: int(row["seed"]) for row in csv.DictReader(f)}
  return np.asarray([seeds[n] for n in names], np.int64)


def editing(
  models,
  volumes: np.ndarray,
  labels: np.ndarray,
  seeds: np.ndarray,
  shape,
  classes: list[int],
  guidance: float | None,
  solver: str = "euler",
  steps: int = 50,
  strength: float | None = None,
) -> tuple[dict, dict]:
  """Edits every scan to every other class present and back to its own (the round trip),
  at `sample.edit`'s guidance and strength (None: its defaults).

  Returns (metrics, montage volumes): metrics has `edit` (`stage_metrics.edit_metrics` over all
  edits) and `round_trip` (PSNR of the round trip against the input and against the VQ-GAN's
  reconstruction, which bounds what any latent edit can reach).
  """
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp

  from latentfm import editing as editing_lib
  from latentfm import sample
  from latentfm.data import cohort
  from latentfm.metrics import image
  from latentfm.nn.vqgan import from_model_range, to_model_range

  guidance = editing_lib.EDIT_GUIDANCE if guidance is None else guidance
  strength = editing_lib.EDIT_STRENGTH if strength is None else strength
  template = cohort.load_template(tuple(int(s) for s in shape))
  src_idx, targets = [], []
  for i in range(len(labels)):
    for t in classes:
      src_idx.append(i)
      targets.append(t)
  src_idx, targets = np.asarray(src_idx), np.asarray(targets, np.int32)
  edited, nfe = [], 0
  for j in range(0, len(src_idx), 8):
    out, used = sample.edit(
      models,
      volumes[src_idx[j : j + 8]],
      labels[src_idx[j : j + 8]],
      targets[j : j + 8],
      guidance=guidance,
      strength=strength,
      solver=solver,
      steps=steps,
    )
    edited.append(out)
    nfe = max(nfe, used)
  edited = np.concatenate(edited)
  truth = np.stack(
    [cohort.make_subject(template, int(t), int(seeds[i])) for i, t in zip(src_idx, targets)]
  )
  other = targets != labels[src_idx]
  # The residual edit (`editing.apply_difference`): the scan plus the edit minus the scan's
  # own-stage regeneration, which the round trip below already computed from the same noise.
  own = {int(src_idx[j]): j for j in np.flatnonzero(~other)}
  residual = editing_lib.apply_difference(
    volumes[src_idx], edited, edited[[own.get(int(i), j) for j, i in enumerate(src_idx)]]
  )
  scored = other & np.isin(src_idx, list(own))  # a scan whose own stage was not trained: none
  metrics = {
    "edit": stage_metrics.edit_metrics(edited[other], volumes[src_idx[other]], truth[other]),
    "residual": stage_metrics.edit_metrics(
      residual[scored], volumes[src_idx[scored]], truth[scored]
    ),
    "solver": solver,
    "guidance": float(guidance),
    "strength": float(strength),
    "subjects": len(volumes),
    "nfe": int(nfe),
  }
  same = ~other
  x = to_model_range(jnp.asarray(volumes[src_idx[same]][..., None]))
  recon = np.asarray(from_model_range(models.vqgan.apply(models.vqgan_variables, x)["recon"]))
  metrics["round_trip"] = {
    "psnr_to_input": stage_metrics.mean_ci(
      np.asarray(image.psnr(edited[same], volumes[src_idx[same]]))
    ),
    "psnr_to_vqgan_recon": stage_metrics.mean_ci(
      np.asarray(image.psnr(edited[same], recon[..., 0]))
    ),
  }
  subject = int(np.argmin(labels))
  rows = [j for j in range(len(src_idx)) if src_idx[j] == subject]
  montage = {
    "truth": truth[rows],
    "edit": edited[rows],
    "residual": residual[rows],
    "targets": targets[rows],
    "source": int(labels[subject]),
  }
  return metrics, montage


def run(
  models,
  key,
  train,
  held_out,
  vq_dir: str,
  vq_shape,
  extract,
  out_dir: str,
  *,
  per_stage: int = 4,
  guidances=(0.0, 1.0, 2.0, 4.0),
  guidance: float = 1.0,
  solver: str = "euler",
  steps: int = 50,
  edit_subjects: int = 0,
  stage_samples: int = 0,
  edit_guidance: float | None = None,
  edit_strength: float | None = None,
) -> dict:
  """The per-stage section of the report (see the module docstring); figures go to `out_dir`.

  Args: train, held_out: `loader.Dataset`s of the VQ-GAN's real data (volumes with labels);
  extract: the headline feature extractor; per_stage: samples per stage and sweep weight;
  guidance: the weight of the per-stage morphometry; stage_samples: samples per stage of the
  morphometry (0: per_stage; more are drawn at `guidance` only); edit_subjects: how many
  held-out scans to edit (0: all), taken one stage after another; edit_guidance,
  edit_strength: `sample.edit`'s guidance and strength (None: its defaults).
  """
  real = np.concatenate([train.volumes, held_out.volumes])
  real_labels = np.concatenate([train.labels, held_out.labels])
  classes = _present(train.labels, models.num_classes)
  features = stage_metrics.stage_features(real)
  known = real_labels >= 0
  section = {
    "classes": classes,
    "per_stage_samples": per_stage,
    "classifier_cv_accuracy": stage_metrics.cross_validated_accuracy(
      features[known], real_labels[known]
    ),
    "real_counts": {int(s): int((real_labels == s).sum()) for s in classes},
  }
  classifier = stage_metrics.fit_classifier(features[known], real_labels[known])
  sweep_ws = sorted(set(float(w) for w in guidances) | {float(guidance)})
  rows, kept = guidance_sweep(
    models,
    key,
    classes,
    per_stage,
    sweep_ws,
    classifier,
    extract,
    extract(train.volumes),
    solver,
    steps,
  )
  section["sweep"] = rows
  section["fd_floor"] = generative.frechet_distance(
    extract(held_out.volumes), extract(train.volumes)
  )
  section["guidance"] = float(guidance)
  volumes, labels = kept[float(guidance)]
  stage_samples = max(stage_samples, per_stage)
  if stage_samples > per_stage:  # more samples where the ordering is checked, not at every w
    import jax  # pylint: disable=import-outside-toplevel

    from latentfm import sample  # pylint: disable=import-outside-toplevel

    more = np.repeat(np.asarray(classes, np.int32), stage_samples - per_stage)
    extra, _ = sample.sample(
      jax.random.fold_in(key, len(sweep_ws)), models, len(more), labels=more,
      guidance=float(guidance), solver=solver, steps=steps,
    )  # fmt: skip
    volumes, labels = np.concatenate([volumes, extra]), np.concatenate([labels, more])
  section["stage_samples"] = stage_samples
  section["per_stage"] = stage_metrics.per_stage_morphometry(volumes, labels, real, real_labels)
  section["ordered"] = {
    m: stage_metrics.ordered_like(section["per_stage"], m) for m in stage_metrics.MEASURES
  }
  measured = tissue_volumes(real[known])
  section["ordered_chance"] = {
    m: stage_metrics.ordered_chance(measured[m], real_labels[known], stage_samples)
    for m in stage_metrics.MEASURES
  }
  stage_figures.sweep_plot(os.path.join(out_dir, "guidance.png"), rows, section["fd_floor"])
  stage_figures.stage_montage(os.path.join(out_dir, "stages.png"), volumes, labels)
  seeds = cohort_seeds(vq_dir, held_out.names)
  if seeds is not None and models.objective == "rectified_flow":
    chosen = _round_robin(held_out.labels, edit_subjects)
    section["editing"], montage = editing(
      models,
      held_out.volumes[chosen],
      held_out.labels[chosen],
      seeds[chosen],
      vq_shape,
      classes,
      edit_guidance,
      solver,
      steps,
      edit_strength,
    )
    stage_figures.edit_montage(os.path.join(out_dir, "editing.png"), montage)
  return section


def _round_robin(labels: np.ndarray, num: int) -> np.ndarray:
  """Indices of `num` scans (0: all) taking each stage in turn, so that few cover every stage."""
  order = sorted(
    range(len(labels)), key=lambda i: (int(np.sum(labels[:i] == labels[i])), int(labels[i]))
  )
  return np.asarray(order[:num] if num > 0 else order, np.int64)


def to_markdown(section: dict) -> str:
  """The per-stage section of `report.md`."""
  from latentfm.data.cohort import STAGE_NAMES  # pylint: disable=import-outside-toplevel

  name = lambda s: STAGE_NAMES[s] if s < len(STAGE_NAMES) else str(s)
  fmt = lambda e: (
    f"{e['mean']:.4g} [{e['ci95'][0]:.3g}, {e['ci95'][1]:.3g}]"
    if e["n"] > 1
    else (f"{e['mean']:.4g}" if e["n"] else "–")
  )
  lines = [
    "## Per stage (class-conditional flow)",
    "",
    f"Stage classifier (logistic regression on CSF/ventricle morphometry) on real "
    f"volumes: **{section['classifier_cv_accuracy']:.2f}** accuracy, 5-fold "
    f"cross-validated (chance {1 / len(section['classes']):.2f}). Real volumes per "
    f"stage: " + ", ".join(f"{name(s)} {n}" for s, n in section["real_counts"].items()) + ".",
    "",
    f"Guidance sweep ({section['per_stage_samples']} samples per stage; FD floor "
    f"{section['fd_floor']:.4g}):",
    "",
    "| guidance w | classifier accuracy on samples | Fréchet distance | NFE |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {r['guidance']:g} | {r['accuracy']:.2f} | {r['fd']:.4g} | {r['nfe']} |"
    for r in section["sweep"]
  ]
  lines += [
    "",
    f"Morphometry per requested stage at w = {section['guidance']:g}, "
    f"{section['stage_samples']} samples per stage (generated vs real of that stage; W1):",
    "",
    "| stage | CSF fraction: model | real | W1 | ventricle fraction: model | real | W1 |",
    "|---|---|---|---|---|---|---|",
  ]
  for s, m in section["per_stage"].items():
    cells = []
    for k in stage_metrics.MEASURES:
      w1 = m[k]["w1"]
      cells += [fmt(m[k]["model"]), fmt(m[k]["real"]), "–" if w1 is None else f"{w1:.3g}"]
    lines.append(f"| {name(int(s))} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "Generated stage means ordered like the real ones: "
    + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in section["ordered"].items())
    + f". Real scans drawn {section['stage_samples']} per stage come out ordered in "
    + ", ".join(f"{k} {v:.0%}" for k, v in section["ordered_chance"].items())
    + " of draws, the most this check can show with so few samples.",
  ]
  if "editing" in section:
    e, r = section["editing"]["edit"], section["editing"]["round_trip"]
    d = section["editing"]["residual"]
    lines += [
      "",
      f"Counterfactual editing of {section['editing']['subjects']} held-out scans to every "
      f"other stage (inverted to t = {section['editing']['strength']:g} and regenerated at "
      f"w = {section['editing']['guidance']:g} with {section['editing']['solver']}, NFE "
      f"{section['editing']['nfe']} both ways), against the same subject generated at "
      "that stage. The residual edit is the scan plus the edit minus the scan regenerated "
      "at its own stage (`sample.edit(..., residual=True)`):",
      "",
      "| measure | edit vs truth | residual edit vs truth | unedited scan vs truth |",
      "|---|---|---|---|",
      f"| PSNR (dB) | {fmt(e['psnr']['edit'])} | {fmt(d['psnr']['edit'])} | "
      f"{fmt(e['psnr']['unedited'])} |",
      f"| SSIM | {fmt(e['ssim']['edit'])} | {fmt(d['ssim']['edit'])} | "
      f"{fmt(e['ssim']['unedited'])} |",
      f"| ventricle-fraction shift | {fmt(e['ventricle_shift']['edit'])} | "
      f"{fmt(d['ventricle_shift']['edit'])} | truth: {fmt(e['ventricle_shift']['truth'])} |",
      f"| ventricle shift gain (slope on the true shift; 1: the true change, 0: none) | "
      f"{e['shift_gain']:.2f} | {d['shift_gain']:.2f} | 0 |",
      "",
      f"Inversion round trip (own stage): PSNR {fmt(r['psnr_to_input'])} dB to the "
      f"input, {fmt(r['psnr_to_vqgan_recon'])} dB to the VQ-GAN reconstruction.",
    ]
  return "\n".join(lines) + "\n"

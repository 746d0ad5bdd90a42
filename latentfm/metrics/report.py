"""The evaluation report: every metric for the model next to its real-data floor.

The floor of a metric is the same computation with held-out real volumes in place of the
generated ones (held-out vs training), i.e. the best value a generator that draws fresh
subjects from the data distribution can expect at these sample sizes.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from latentfm.metrics import artifacts, generative, image
from latentfm.metrics.features import FeatureExtractor, tissue_volumes

# Thesis results (ADNI, 64³; ONE generated sample against ONE real volume).
THESIS = {"mse": 3.18e-2, "nmse": 1.825, "psnr": 21.00, "ssim": 0.7364, "ms_ssim": 0.6505}

IMAGE_METRICS: dict[str, Callable] = {
  "mse": image.mse,
  "nmse": image.nmse,
  "psnr": image.psnr,
  "ssim": image.ssim,
  "ms_ssim": image.ms_ssim,
}
HIGHER_IS_BETTER = {"psnr", "ssim", "ms_ssim"}
FEATURE_NOTES = {
  "vgg25d": "ImageNet VGG16 on slices of the three planes, pooled (pretrained)",
  "random": "a fixed random 3D conv net plus intensity and texture statistics",
}
# Set statistics are biased upwards by the duplicates of resampling with replacement.
SET_BRACKETS = (
  "Brackets here: the middle 95% of the statistic over resampled sets. Duplicate "
  "draws raise these statistics, so a bracket can lie above its value."
)


def _summary(values: np.ndarray, seed: int = 0) -> dict:
  values = np.asarray(values, np.float64)
  low, high = generative.bootstrap_ci(values, num_resamples=1000, seed=seed)
  return {"mean": float(values.mean()), "ci95": [float(low), float(high)], "n": int(len(values))}


def paired_image_metrics(queries: np.ndarray, references: np.ndarray) -> dict[str, dict]:
  """Each query against its nearest reference (voxel RMSE): the thesis table, done per volume.

  Args: queries `[N, D, H, W]`, references `[M, D, H, W]`, both in [0, 1].
  Returns: {metric: {"mean", "ci95": [low, high], "n"}} for mse, nmse, psnr (dB), ssim, ms_ssim.
  """
  _, idx = generative.nearest_neighbour_distances(queries, references)
  matched = references[idx]
  return {name: _summary(np.asarray(fn(queries, matched))) for name, fn in IMAGE_METRICS.items()}


def reconstruction_metrics(
  recon: np.ndarray, real: np.ndarray, periods: tuple[int, ...] = (2, 4)
) -> dict[str, dict]:
  """Autoencoder reconstruction quality (recon vs its own input) over a validation set.

  `periods` are the decoder's stride periods, for `checkerboard_p<period>`: the
  reconstructions' spectral prominence there over the inputs' (1 = no added pattern).

  Args: recon, real `[N, D, H, W]` in [0, 1], paired.
  Returns: {metric: {"mean", "ci95", "n"}} plus `checkerboard_p<period>` floats (1: none).
  """
  out = {name: _summary(np.asarray(fn(recon, real))) for name, fn in IMAGE_METRICS.items()}
  out["l1"] = _summary(np.abs(recon - real).mean(axis=(1, 2, 3)))
  for p, ratio in artifacts.checkerboard_ratio(recon, real, periods).items():
    out[f"checkerboard_p{p}"] = ratio
  return out


def _two_sample(fn, a, b, seed=0) -> dict:
  low, high = generative.bootstrap_ci(fn, a, b, num_resamples=200, seed=seed)
  return {"value": float(fn(a, b)), "ci95": [float(low), float(high)]}


def distribution_metrics(
  samples: np.ndarray, train: np.ndarray, features: dict[str, FeatureExtractor]
) -> dict[str, dict]:
  """Per extractor Fréchet distance and KID, then morphometry W1, against the training volumes.

  Keys: `fd_<name>`, `kid_<name>` for each named extractor (in order), `w1_<measure>`.

  Args: samples `[N, D, H, W]`, train `[M, D, H, W]` in [0, 1]; features: name -> extractor.
  Returns: {key: {"value", "ci95": [low, high]}}.
  """
  kid = lambda a, b: generative.kernel_inception_distance(a, b, num_subsets=20)[0]
  out = {}
  for name, extract in features.items():
    fs, ft = extract(samples), extract(train)
    out[f"fd_{name}"] = _two_sample(generative.frechet_distance, fs, ft)
    out[f"kid_{name}"] = _two_sample(kid, fs, ft)
  ms, mt = tissue_volumes(samples), tissue_volumes(train)
  for key in ("csf_fraction", "ventricle_fraction", "brain"):
    out[f"w1_{key}"] = _two_sample(generative.wasserstein_1, ms[key], mt[key])
  return out


def once_per_set(extract: FeatureExtractor) -> FeatureExtractor:
  """`extract`, remembering its features per volume set (by content): the training set's are
  needed by the model row, the floor row and the memorisation check alike.

  Args: extract `[N, D, H, W] -> (N, F)`. Returns: the same function, cached.
  """
  cache: dict[bytes, np.ndarray] = {}

  def cached(volumes) -> np.ndarray:
    v = np.ascontiguousarray(volumes)
    key = hashlib.sha1(v.tobytes()).digest() + repr((v.shape, v.dtype.str)).encode()
    if key not in cache:
      cache[key] = extract(v)
    return cache[key]

  return cached


def evaluate(
  samples: np.ndarray,
  train: np.ndarray,
  held_out: np.ndarray,
  features: dict[str, FeatureExtractor],
) -> dict:
  """All generative figures for `samples`, each with its held-out floor.

  `features` names the extractors, headline first (e.g. {"vgg25d": ..., "random": ...}); the
  first one also measures memorisation in feature space.

  Args:
    samples `[N, D, H, W]`, train `[M, D, H, W]`, held_out `[K, D, H, W]`, all in [0, 1].
  Returns:
    the report dict (JSON-ready): sizes, thesis_table, distribution, diversity, memorisation,
    morphometry.
  """
  if not features:
    raise ValueError("evaluate needs at least one feature extractor")
  features = {name: once_per_set(extract) for name, extract in features.items()}
  headline = next(iter(features))
  report = {
    "sizes": {"samples": len(samples), "train": len(train), "held_out": len(held_out)},
    "headline_features": headline,
  }
  real = np.concatenate([train, held_out])
  report["thesis_table"] = {
    "model": paired_image_metrics(samples, real),
    "floor": paired_image_metrics(held_out, train),
    "thesis": THESIS,
  }
  report["distribution"] = {
    "model": distribution_metrics(samples, train, features),
    "floor": distribution_metrics(held_out, train, features),
  }
  report["diversity"] = generative.diversity(samples, held_out)
  mem = generative.memorisation_report(samples, train, held_out)
  mem_f = generative.memorisation_report(samples, train, held_out, feature_fn=features[headline])
  report["memorisation"] = {
    "voxel": _memo(mem),
    "feature": _memo(mem_f),
    "generated_to_train": np.asarray(mem["generated_to_train"]).tolist(),
    "held_out_to_train": np.asarray(mem["held_out_to_train"]).tolist(),
  }
  morph_s, morph_h = tissue_volumes(samples), tissue_volumes(held_out)
  report["morphometry"] = {
    k: {"model": _summary(morph_s[k]), "floor": _summary(morph_h[k])}
    for k in ("csf_fraction", "ventricle_fraction")
  }
  return report


def headline(report: dict) -> dict[str, float]:
  """The headline figures: the first extractor's FD and KID, model and floor, and the FD ratio.

  Args: report: from `evaluate`. Returns: {features, fd, fd_floor, fd_ratio, kid, kid_floor}.
  """
  name = report["headline_features"]
  model, floor = report["distribution"]["model"], report["distribution"]["floor"]
  fd, fd_floor = model[f"fd_{name}"]["value"], floor[f"fd_{name}"]["value"]
  return {
    "features": name,
    "fd": fd,
    "fd_floor": fd_floor,
    "fd_ratio": fd / fd_floor if fd_floor > 0 else float("inf"),
    "kid": model[f"kid_{name}"]["value"],
    "kid_floor": floor[f"kid_{name}"]["value"],
  }


def _memo(m: dict) -> dict:
  return {
    k: (np.asarray(m[k]).tolist() if isinstance(m[k], np.ndarray) else m[k])
    for k in (
      "privacy_threshold",
      "threshold_p5",
      "num_flagged",
      "fraction_flagged",
      "flagged_indices",
      "chance_fraction",
      "space",
    )
  }


def _fmt(entry) -> str:
  if isinstance(entry, dict) and "mean" in entry:
    lo, hi = entry["ci95"]
    return f"{entry['mean']:.4g} [{lo:.3g}, {hi:.3g}]"
  if isinstance(entry, dict) and "value" in entry:
    lo, hi = entry["ci95"]
    return f"{entry['value']:.4g} [{lo:.3g}, {hi:.3g}]"
  return "–" if entry is None else f"{entry:.4g}"


def to_markdown(report: dict) -> str:
  """The report as Markdown tables: metric | model | floor | thesis.

  Args: report: from `evaluate` (optionally with "reconstruction"). Returns: Markdown text.
  """
  s = report["sizes"]
  lines = [
    "# Evaluation report",
    "",
    f"{s['samples']} generated volumes, {s['train']} training and {s['held_out']} held-out "
    "real volumes. Brackets: 95% bootstrap intervals. Floor: held-out real volumes "
    "in place of the samples (the best a generator of new subjects can expect).",
    "",
  ]
  if "geometry" in report:
    from latentfm.data.geometry import Geometry  # pylint: disable=import-outside-toplevel

    lines += [f"Volumes of {Geometry.from_dict(report['geometry']).describe()}.", ""]
  if "reconstruction" in report:
    lines += ["## VQ-GAN reconstruction (validation set)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["reconstruction"].items()]
    lines += [
      "",
      "checkerboard_pN: the reconstructions' spectral peak at the decoder's stride "
      "period N over the inputs' (1: no pattern added).",
      "",
    ]
  h = headline(report)
  lines += [
    f"**Headline ({h['features']} features): Fréchet distance {h['fd']:.4g} against a "
    f"floor of {h['fd_floor']:.4g} ({h['fd_ratio']:.2f}x); KID {h['kid']:.3g} against "
    f"{h['kid_floor']:.3g}.**",
    "",
  ]
  t = report["thesis_table"]
  lines += [
    "## Thesis metrics (each volume vs its nearest real volume)",
    "",
    "| metric | model | floor | thesis (1 sample vs 1 volume) |",
    "|---|---|---|---|",
  ]
  for k in IMAGE_METRICS:
    lines.append(
      f"| {k}{' ↑' if k in HIGHER_IS_BETTER else ' ↓'} | {_fmt(t['model'][k])} | "
      f"{_fmt(t['floor'][k])} | {_fmt(t['thesis'].get(k))} |"
    )
  d = report["distribution"]
  names = "; ".join(
    f"{n}: {FEATURE_NOTES.get(n, 'user-supplied')}"
    for n in [k.split("_", 1)[1] for k in d["model"] if k.startswith("fd_")]
  )
  lines += [
    "",
    "## Distribution (lower is better)",
    "",
    f"Features: {names}.",
    SET_BRACKETS,
    "",
    "| metric | model | floor |",
    "|---|---|---|",
  ]
  lines += [f"| {k} | {_fmt(d['model'][k])} | {_fmt(d['floor'][k])} |" for k in d["model"]]
  v = report["diversity"]
  m = report["memorisation"]
  lines += [
    "",
    "## Diversity and privacy",
    "",
    "| metric | model | floor |",
    "|---|---|---|",
    f"| mean pairwise MS-SSIM (lower = more diverse) | {v['generated_ms_ssim']:.4f} | "
    f"{v['real_ms_ssim']:.4f} |",
  ]
  for space in ("voxel", "feature"):
    mm = m[space]
    lines.append(
      f"| samples closer to a training scan than any held-out scan ({space}) | "
      f"{mm['num_flagged']} / {s['samples']} | expected by chance "
      f"{mm['chance_fraction']:.2f} |"
    )
  lines += ["", "## Morphometry", "", "| measure | model | floor |", "|---|---|---|"]
  lines += [
    f"| {k} | {_fmt(x['model'])} | {_fmt(x['floor'])} |" for k, x in report["morphometry"].items()
  ]
  return "\n".join(lines) + "\n"

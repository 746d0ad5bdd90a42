"""Percentile bootstrap intervals for per-sample values and for set statistics."""

from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(
  values_or_fn: np.ndarray | Callable[..., float],
  *samples,
  num_resamples: int = 1000,
  alpha: float = 0.05,
  seed: int = 0,
) -> tuple[float, float]:
  """Percentile bootstrap ``(1 - alpha)`` confidence interval.

  Two forms:

  * ``bootstrap_ci(values)`` -- CI of the mean of a per-sample metric
    ``[N]`` (e.g. per-volume SSIM).
  * ``bootstrap_ci(fn, a, b, ...)`` -- CI of ``fn(a*, b*, ...)`` where each
    sample set is resampled with replacement along axis 0, independently,
    e.g. ``bootstrap_ci(frechet_distance, feats_gen, feats_real)``.

  Caveat for set statistics: resampling with replacement duplicates points,
  which shrinks the effective sample size; for biased statistics such as the
  Fréchet distance the interval is shifted upwards and is best read as a
  measure of spread, not of the population value.

  Args:
    values_or_fn: per-sample values `(N,)`, or a statistic `fn(*samples) -> float`.
    samples: with `fn`, the sets it takes, each resampled along axis 0.
  Returns:
    (low, high), floats.
  """
  rng = np.random.default_rng(seed)
  if callable(values_or_fn):
    fn, sets = values_or_fn, [np.asarray(s) for s in samples]
    if not sets:
      raise ValueError("Pass the sample set(s) the statistic is computed on.")
  else:
    if samples:
      raise ValueError("Extra samples need a statistic function.")
    fn, sets = np.mean, [np.asarray(values_or_fn, np.float64).ravel()]
  stats = np.empty(num_resamples)
  for k in range(num_resamples):
    draws = [s[rng.integers(0, len(s), len(s))] for s in sets]
    stats[k] = float(fn(*draws))
  low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
  return float(low), float(high)


__all__ = ["bootstrap_ci"]

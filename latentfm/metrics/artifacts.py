"""Checkerboard measure: spectral peaks at the decoder's stride periods.

A transposed convolution of stride s whose kernel size is not a multiple of s gives output
phases different numbers of kernel taps, which leaves a pattern with period s (and, stacked,
periods 2, 4, ... for a 4x decoder). In the spectrum such a pattern is a peak at the frequency
bin n / p of a period p; natural images and blur have smooth spectra there. The prominence of
that bin over its neighbours, per axis, measures the pattern; comparing the reconstructions'
prominence with the inputs' separates artifacts from structure that the data really has.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from latentfm.metrics.features import as_volumes


def decoder_periods(downsample: Sequence[int]) -> tuple[int, ...]:
  """The pattern periods of a decoder upsampling by `downsample` (powers of two): 2, 4, ...

  Args:
    downsample: per-axis total factors, e.g. (4, 4, 4).
  Returns:
    (2, 4, ..., max factor); empty for no upsampling.
  """
  return tuple(2**k for k in range(1, max(downsample).bit_length()))


def _axis_power(volumes: np.ndarray, axis: int) -> np.ndarray:
  """Mean power spectrum along `axis` (1..3) of (N, D, H, W), summed over the other axes."""
  centred = volumes - volumes.mean(axis=(1, 2, 3), keepdims=True)
  spectrum = np.abs(np.fft.fft(centred, axis=axis)) ** 2
  other = tuple(a for a in (1, 2, 3) if a != axis)
  return spectrum.sum(axis=other).mean(axis=0)  # (n,)


def periodic_prominence(volumes, periods: Sequence[int] = (2, 4)) -> dict[int, float]:
  """Spectral peak height at each period, over its neighbouring bins, averaged over axes.

  Args:
    volumes: (N, D, H, W) (or with a trailing channel of 1); axes shorter than 2 * period are
      skipped for that period.
    periods: pattern periods in voxels (the decoder's cumulative strides).
  Returns:
    {period: prominence}; about 1 for a smooth spectrum, far above 1 for a periodic pattern.
    NaN for a period that no axis is long enough for.
  """
  v = as_volumes(volumes).astype(np.float64)
  out = {}
  for p in periods:
    ratios = []
    for axis in (1, 2, 3):
      n = v.shape[axis]
      if n < 2 * p or n % p:
        continue
      power = _axis_power(v, axis)
      k = n // p
      neighbours = [power[j] for j in (k - 1, k + 1) if 0 < j < n and j != n - k]
      ratios.append(power[k] / max(np.mean(neighbours), 1e-30))
    out[int(p)] = float(np.mean(ratios)) if ratios else float("nan")
  return out


def checkerboard_ratio(recon, inputs, periods: Sequence[int] = (2, 4)) -> dict[int, float]:
  """Reconstructions' periodic prominence over the inputs' (1: no added pattern).

  Args:
    recon, inputs: (N, D, H, W) volumes of the same shape.
    periods: as in `periodic_prominence`.
  Returns:
    {period: prominence(recon) / prominence(inputs)}.
  """
  r, i = periodic_prominence(recon, periods), periodic_prominence(inputs, periods)
  return {p: r[p] / i[p] for p in r}

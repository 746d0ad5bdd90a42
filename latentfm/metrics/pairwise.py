"""Diversity of a set of volumes: MS-SSIM between pairs of its members.

Lower mean pairwise MS-SSIM means a more diverse set; a generated set far more alike than the
real one suggests mode collapse. Volumes are ``[N, D, H, W]`` in [0, 1].
"""

from __future__ import annotations

import numpy as np

from latentfm.metrics import image
from latentfm.metrics.features import as_volumes


def pairwise_ms_ssim(
  volumes, max_pairs: int | None = None, seed: int = 0, batch_size: int = 16
) -> np.ndarray:
  """MS-SSIM of pairs ``(i, j), i < j``: all of them, or a random subset.

  Args:
    volumes: ``[N, D, H, W]`` in [0, 1], N >= 2.
    max_pairs: None (all N (N - 1) / 2 pairs) or the number of pairs to draw.
    seed: seed of the drawn pairs.
    batch_size: pairs per compiled call.
  Returns:
    float64 ``[P]`` values in [0, 1], pairs in lexicographic order (or in the drawn order
    when ``max_pairs`` is below the number of pairs). Higher = more similar.
  """
  v = as_volumes(volumes)
  i, j = np.triu_indices(len(v), 1)
  if len(i) == 0:
    raise ValueError("Need at least 2 volumes.")
  if max_pairs is not None and max_pairs < len(i):
    pick = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
    i, j = i[pick], j[pick]
  out = []
  for start in range(0, len(i), batch_size):
    bi, bj = i[start : start + batch_size], j[start : start + batch_size]
    pad = batch_size - len(bi) if len(i) > batch_size else 0
    bi, bj = (np.pad(idx, (0, pad), mode="edge") for idx in (bi, bj))
    out.append(np.asarray(image.ms_ssim(v[bi], v[bj]))[: len(bi) - pad])
  return np.concatenate(out).astype(np.float64)


def diversity(generated, real, max_pairs: int | None = None, seed: int = 0) -> dict[str, float]:
  """Mean pairwise MS-SSIM within the generated and within the real set.

  Lower values mean a more diverse set. A generated value well above the
  real one suggests mode collapse (samples too alike); well below it can mean
  noisy or implausible samples.

  Args:
    generated: ``[N, D, H, W]`` in [0, 1], N >= 2.
    real: ``[M, D, H, W]`` in [0, 1], M >= 2.
    max_pairs, seed: as for :func:`pairwise_ms_ssim`, for each set.
  Returns:
    ``{"generated_ms_ssim", "real_ms_ssim"}`` (floats in [0, 1]) and their ``difference``
    (generated - real, in [-1, 1]; ideally ~0).
  """
  gen = float(pairwise_ms_ssim(generated, max_pairs, seed).mean())
  ref = float(pairwise_ms_ssim(real, max_pairs, seed).mean())
  return dict(generated_ms_ssim=gen, real_ms_ssim=ref, difference=gen - ref)

"""Distribution-level metrics for generated 3D volumes.

All functions take numpy or JAX arrays and return plain floats, numpy arrays
or dicts of them; randomness is drawn from ``seed`` only. Volumes are
``[N, D, H, W]`` in [0, 1]; feature sets are ``[N, F]`` (see
:mod:`latentfm.metrics.features` for extractors and their caveats).

What the numbers mean (lower is better unless stated):

* :func:`frechet_distance` -- Fréchet distance between Gaussians fitted to two
  feature sets (FID-style). 0 for identical statistics. Biased upwards for
  small samples, so compare only at equal sample sizes.
* :func:`kernel_inception_distance` -- KID, the unbiased MMD^2 with a cubic
  polynomial kernel, averaged over random subsets. Unbiased, so it can be
  slightly negative when the distributions match. :func:`mmd_rbf` is the same
  with a Gaussian kernel.
* :func:`diversity` (from :mod:`latentfm.metrics.pairwise`) -- mean pairwise
  MS-SSIM within a set; lower means more diverse. Compare generated against
  real: much higher than real suggests mode collapse.
* :func:`morphometry_distance` -- 1-D Wasserstein distances between the
  distributions of brain / CSF / ventricle measures (:func:`tissue_volumes`).
* :func:`memorisation_report` -- nearest-neighbour distances to the training
  set; generated samples closer to a training scan than any held-out real
  scan are flagged as possible copies (fewer is better).
* :func:`bootstrap_ci` -- percentile bootstrap confidence intervals.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from latentfm.metrics.bootstrap import bootstrap_ci  # noqa: F401 (public API)
from latentfm.metrics.features import FeatureExtractor, as_volumes, tissue_volumes
from latentfm.metrics.pairwise import diversity, pairwise_ms_ssim  # noqa: F401 (public API)


def _as_features(x) -> np.ndarray:
  f = np.asarray(x, dtype=np.float64)
  if f.ndim != 2:
    raise ValueError(f"Expected features [N, F], got shape {f.shape}.")
  return f


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix."""
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b, eps: float = 1e-6) -> float:
  """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

  The trace of the matrix square root is computed in the symmetric form
  ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))`` from eigenvalues, which is real and
  stable for singular (rank-deficient) covariances. ``eps`` is added to both
  diagonals; it cancels exactly for equal covariances and otherwise changes
  the result by ``O(eps)``.

  Args:
    mu_a, mu_b: means `(F,)`; cov_a, cov_b: covariances `(F, F)`.
  Returns:
    the distance, a float >= 0 (0: equal Gaussians).
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  eye = eps * np.eye(len(mu_a))
  cov_a = np.asarray(cov_a, np.float64) + eye
  cov_b = np.asarray(cov_b, np.float64) + eye
  root_a = _sqrtm_psd(cov_a)
  middle = root_a @ cov_b @ root_a
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
  value = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
  return float(max(value - 2.0 * tr_sqrt, 0.0))


def _common_span(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both sets in orthonormal coordinates of the span of their points' offsets.

  Both means' difference and both covariances live in the span of the points minus any one
  point, and an orthonormal change of basis keeps every term of the Fréchet distance (the `eps`
  terms outside the span cancel), so with fewer points than features the distance is computed
  exactly in at most `len(a) + len(b) - 1` dimensions instead of the features' width.
  """
  if a.shape[1] < len(a) + len(b):
    return a, b
  stacked = np.concatenate([a, b])
  offsets = stacked - stacked[0]
  _, s, vt = np.linalg.svd(offsets, full_matrices=False)
  basis = vt[s > s.max() * 1e-12] if s.max() > 0 else vt[:1]
  coords = offsets @ basis.T
  return coords[: len(a)], coords[len(a) :]


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
  """Fréchet distance between Gaussian fits (means, unbiased covariances).

  Both sets need at least 2 samples. With fewer samples than feature
  dimensions the covariances are singular; the symmetric eigen formulation
  (see :func:`frechet_distance_from_stats`) handles that, but the estimate is
  then strongly biased upwards. Lower is better; 0 means equal statistics.

  Args:
    feats_a, feats_b: features `(N_a, F)` and `(N_b, F)`, N >= 2 each.
  Returns:
    the distance, a float >= 0.
  """
  a, b = _as_features(feats_a), _as_features(feats_b)
  if min(len(a), len(b)) < 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"Need >= 2 samples of equal width, got {a.shape}, {b.shape}.")
  a, b = _common_span(a, b)
  cov = lambda x: np.atleast_2d(np.cov(x, rowvar=False))
  return frechet_distance_from_stats(a.mean(0), cov(a), b.mean(0), cov(b), eps)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The KID kernel ``k(x, y) = (x . y / d + 1)^3``.

  Args: x `(N, F)`, y `(M, F)`. Returns: `(N, M)`.
  """
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
  """Unbiased MMD^2 from kernel matrices (diagonals of k_aa, k_bb excluded).

  Args: k_aa `(M, M)`, k_bb `(N, N)`, k_ab `(M, N)`, M, N >= 2.
  Returns: the estimate, a float (can be slightly negative).
  """
  m, n = len(k_aa), len(k_bb)
  if min(m, n) < 2:
    raise ValueError("The unbiased MMD^2 needs >= 2 samples per set.")
  term_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
  term_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
  return float(term_a + term_b - 2.0 * k_ab.mean())


def kernel_inception_distance(
  feats_a, feats_b, subset_size: int | None = None, num_subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
  """KID: mean and std of the unbiased polynomial-kernel MMD^2 over subsets.

  Each of ``num_subsets`` rounds draws ``subset_size`` samples without
  replacement from each set (default ``min(len(a), len(b), 1000)``, as in
  the reference implementations). When ``subset_size`` equals both set sizes
  every round gives the full-set estimate and the std is 0. Lower is better;
  values near 0 (possibly negative) mean the sets are indistinguishable.

  Args:
    feats_a, feats_b: features `(N_a, F)`, `(N_b, F)`.
  Returns:
    (mean, std) of MMD^2 over the subsets, floats.
  """
  a, b = _as_features(feats_a), _as_features(feats_b)
  m = min(len(a), len(b), 1000) if subset_size is None else int(subset_size)
  if not 2 <= m <= min(len(a), len(b)):
    raise ValueError(f"subset_size {m} must be in [2, {min(len(a), len(b))}].")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    k = polynomial_kernel
    values.append(mmd2_unbiased(k(x, x), k(y, y), k(x, y)))
  return float(np.mean(values)), float(np.std(values))


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
  return np.clip(d, 0.0, None)


def mmd_rbf(feats_a, feats_b, bandwidth: float | None = None) -> float:
  """Unbiased MMD^2 with the Gaussian kernel ``exp(-|x-y|^2 / (2 h^2))``.

  ``h`` defaults to the median heuristic: the median Euclidean distance over
  all distinct pairs of the pooled sample. Lower is better; the unbiased
  estimate is near 0 (possibly negative) for equal distributions and at most
  2.

  Args: feats_a `(N_a, F)`, feats_b `(N_b, F)`; bandwidth h > 0 or None.
  Returns: the estimate, a float in about [-0.1, 2].
  """
  a, b = _as_features(feats_a), _as_features(feats_b)
  if bandwidth is None:
    pooled = np.concatenate([a, b])
    d2 = _sq_dists(pooled, pooled)[np.triu_indices(len(pooled), 1)]
    bandwidth = float(np.median(np.sqrt(d2))) or 1.0
  gamma = 1.0 / (2.0 * bandwidth**2)
  kernel = lambda x, y: np.exp(-gamma * _sq_dists(x, y))
  return mmd2_unbiased(kernel(a, a), kernel(b, b), kernel(a, b))


def wasserstein_1(a, b) -> float:
  """1-Wasserstein (earth mover's) distance between two 1-D samples.

  Args: a `(N,)`, b `(M,)` (flattened if not 1-D). Returns: a float >= 0, in a's units.
  """
  return float(scipy.stats.wasserstein_distance(np.ravel(a), np.ravel(b)))


MORPHOMETRY_MEASURES = (
  "brain",
  "csf",
  "gm",
  "wm",
  "ventricles",
  "csf_fraction",
  "ventricle_fraction",
)


def morphometry_distance(generated, real, **tissue_kwargs) -> dict[str, float]:
  """W1 between generated and real distributions of each tissue measure.

  Measures are those of :func:`~latentfm.metrics.features.tissue_volumes`
  (``tissue_kwargs`` are passed on); absolute volumes are in voxels, or ml
  with ``voxel_size``. 0 means matching distributions; lower is better.

  Args:
    generated `[N, D, H, W]`, real `[M, D, H, W]` in [0, 1].
  Returns:
    {measure: W1} for each of `MORPHOMETRY_MEASURES`.
  """
  gen = tissue_volumes(generated, **tissue_kwargs)
  ref = tissue_volumes(real, **tissue_kwargs)
  return {k: wasserstein_1(gen[k], ref[k]) for k in MORPHOMETRY_MEASURES}


def _rmse_nearest(
  queries: np.ndarray, refs: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Nearest neighbour by ``|q|^2 + |r|^2 - 2 q.r`` (float64, in blocks).

  The search uses the fast Gram form; the returned RMSE of each winning pair
  is then recomputed directly, so exact copies give exactly 0.
  """
  q = queries.reshape(len(queries), -1)
  r = refs.reshape(len(refs), -1)
  best = np.full(len(q), np.inf)
  index = np.zeros(len(q), np.int64)
  for qs in range(0, len(q), batch_size):
    qb = q[qs : qs + batch_size].astype(np.float64)
    for rs in range(0, len(r), batch_size):
      rb = r[rs : rs + batch_size].astype(np.float64)
      d = _sq_dists(qb, rb)
      arg = d.argmin(1)
      val = d[np.arange(len(qb)), arg]
      better = val < best[qs : qs + len(qb)]
      best[qs : qs + len(qb)][better] = val[better]
      index[qs : qs + len(qb)][better] = arg[better] + rs
  exact = [np.sqrt(np.mean((q[k].astype(np.float64) - r[index[k]]) ** 2)) for k in range(len(q))]
  return np.asarray(exact), index


def nearest_neighbour_distances(
  queries, references, feature_fn: FeatureExtractor | None = None, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
  """Distance from each query to its nearest reference, and that index.

  Without ``feature_fn``: voxel-space RMSE ``sqrt(mean((q - r)^2))``,
  computed in ``batch_size`` blocks to bound memory. With it: Euclidean
  distance between ``feature_fn`` vectors.

  Args:
    queries: ``[Nq, D, H, W]`` in [0, 1].
    references: ``[Nr, D, H, W]`` in [0, 1], the same (D, H, W) without ``feature_fn``.
    feature_fn: None (voxel RMSE) or a :data:`FeatureExtractor`.
    batch_size: volumes per block of the voxel-space search.
  Returns:
    ``(distances, indices)``: float64 ``[Nq]`` distances >= 0 (RMSE in [0, 1] in voxel
    space), and int64 ``[Nq]`` indices into ``references``.
  """
  if feature_fn is None:
    q, r = as_volumes(queries), as_volumes(references)
    if q.shape[1:] != r.shape[1:]:
      raise ValueError(f"Shape mismatch: {q.shape} vs {r.shape}.")
    return _rmse_nearest(q, r, batch_size)
  return _feature_nearest(feature_fn(queries), feature_fn(references))


def _feature_nearest(fq, fr) -> tuple[np.ndarray, np.ndarray]:
  fq, fr = _as_features(fq), _as_features(fr)
  d = np.sqrt(_sq_dists(fq, fr))
  arg = d.argmin(1)
  return d[np.arange(len(fq)), arg], arg


def memorisation_report(
  generated, train, held_out, feature_fn: FeatureExtractor | None = None, batch_size: int = 32
) -> dict:
  """Flags generated samples that are suspiciously close to training scans.

  The reference scale is how close unseen real scans come to the training
  set: ``held_out_to_train`` (each held-out scan's nearest-training distance).
  Its minimum is the ``privacy_threshold``; a generated sample closer to a
  training scan than that (``distance < threshold``) is closer than ANY
  held-out scan is, and is flagged as a possible copy. The 5th percentile is
  reported as a looser threshold (``fraction_below_p5``). Distances are voxel
  RMSE, or feature-space L2 with ``feature_fn``; lower distances = closer.

  Chance level: if generated samples were fresh draws from the data
  distribution (exchangeable with the held-out scans), each would fall below
  the held-out minimum with probability ``1 / (N_held_out + 1)``, reported as
  ``chance_fraction``. A ``fraction_flagged`` near that is expected; well
  above it, or any sample at distance ~0, points to memorisation.

  Args:
    generated: ``[Ng, D, H, W]`` in [0, 1].
    train: ``[Nt, D, H, W]`` in [0, 1], the training scans.
    held_out: ``[Nh, D, H, W]`` in [0, 1], real scans the model never saw.
    feature_fn: None (voxel RMSE) or a :data:`FeatureExtractor`.
    batch_size: volumes per block of the voxel-space search.
  Returns:
    Dict with ``generated_to_train`` [Ng], ``generated_nn_index`` [Ng] (index
    into ``train``), ``held_out_to_train`` [Nh], ``privacy_threshold``,
    ``threshold_p5``, ``num_flagged``, ``fraction_flagged``,
    ``flagged_indices`` (into ``generated``), ``chance_fraction``,
    ``fraction_below_p5`` and ``space`` ('voxel' or 'feature').
  """
  if feature_fn is None:
    gen_d, gen_i = nearest_neighbour_distances(generated, train, batch_size=batch_size)
    held_d, _ = nearest_neighbour_distances(held_out, train, batch_size=batch_size)
  else:  # features of the training set are computed once
    f_train = feature_fn(train)
    gen_d, gen_i = _feature_nearest(feature_fn(generated), f_train)
    held_d, _ = _feature_nearest(feature_fn(held_out), f_train)
  threshold = float(held_d.min())
  p5 = float(np.percentile(held_d, 5))
  flagged = np.flatnonzero(gen_d < threshold)
  return dict(
    generated_to_train=gen_d,
    generated_nn_index=gen_i,
    held_out_to_train=held_d,
    privacy_threshold=threshold,
    threshold_p5=p5,
    num_flagged=int(len(flagged)),
    fraction_flagged=float(len(flagged) / len(gen_d)),
    flagged_indices=flagged,
    chance_fraction=1.0 / (len(held_d) + 1),
    fraction_below_p5=float(np.mean(gen_d < p5)),
    space="voxel" if feature_fn is None else "feature",
  )

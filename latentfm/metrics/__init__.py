"""Evaluation metrics."""

from latentfm.metrics.features import (
  FeatureExtractor,
  intensity_histogram_features,
  random_conv_features,
  tissue_volumes,
)
from latentfm.metrics.generative import (
  bootstrap_ci,
  diversity,
  frechet_distance,
  kernel_inception_distance,
  memorisation_report,
  mmd_rbf,
  morphometry_distance,
  nearest_neighbour_distances,
  pairwise_ms_ssim,
  wasserstein_1,
)
from latentfm.metrics.image import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales, mse, nmse, psnr, ssim

"""Evaluation metrics."""

from latentfm.metrics.features import FeatureExtractor
from latentfm.metrics.features import intensity_histogram_features
from latentfm.metrics.features import random_conv_features
from latentfm.metrics.features import tissue_volumes
from latentfm.metrics.generative import bootstrap_ci
from latentfm.metrics.generative import diversity
from latentfm.metrics.generative import frechet_distance
from latentfm.metrics.generative import kernel_inception_distance
from latentfm.metrics.generative import memorisation_report
from latentfm.metrics.generative import mmd_rbf
from latentfm.metrics.generative import morphometry_distance
from latentfm.metrics.generative import nearest_neighbour_distances
from latentfm.metrics.generative import pairwise_ms_ssim
from latentfm.metrics.generative import wasserstein_1
from latentfm.metrics.image import MS_SSIM_WEIGHTS
from latentfm.metrics.image import ms_ssim
from latentfm.metrics.image import ms_ssim_scales
from latentfm.metrics.image import mse
from latentfm.metrics.image import nmse
from latentfm.metrics.image import psnr
from latentfm.metrics.image import ssim

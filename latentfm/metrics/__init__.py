"""Evaluation metrics."""

from latentfm.metrics.image import MS_SSIM_WEIGHTS
from latentfm.metrics.image import ms_ssim
from latentfm.metrics.image import ms_ssim_scales
from latentfm.metrics.image import mse
from latentfm.metrics.image import nmse
from latentfm.metrics.image import psnr
from latentfm.metrics.image import ssim

"""The checkerboard measure: a stride-period pattern stands out; smooth structure, noise don't."""

import numpy as np
import scipy.ndimage as ndi

from latentfm.data import cohort
from latentfm.metrics import artifacts


def _brains(n=3):
  template = cohort.load_template((32, 32, 32))
  return np.stack([cohort.make_subject(template, i % 4, 50 + i) for i in range(n)])


def test_pattern_of_period_2_and_4_is_prominent_and_blur_is_not():
  brains = _brains()
  grid = np.indices((32, 32, 32))
  period2 = 0.03 * (-1.0) ** grid.sum(0)
  period4 = 0.03 * np.cos(np.pi / 2 * grid).sum(0)
  clean = artifacts.periodic_prominence(ndi.gaussian_filter(brains, (0, 1, 1, 1)))
  assert all(0.3 < v < 3 for v in clean.values()), clean
  with2 = artifacts.checkerboard_ratio(ndi.gaussian_filter(brains, (0, 1, 1, 1)) + period2, brains)
  with4 = artifacts.checkerboard_ratio(brains + period4, brains)
  assert with2[2] > 10 and with4[4] > 2.5, (with2, with4)
  noisy = brains + 0.05 * np.random.default_rng(0).standard_normal(brains.shape)
  assert all(0.3 < v < 3 for v in artifacts.checkerboard_ratio(noisy, brains).values())


def test_short_axes_give_nan():
  assert np.isnan(artifacts.periodic_prominence(np.zeros((1, 4, 4, 4)) + 1, (4,))[4])


def test_decoder_periods():
  assert artifacts.decoder_periods((4, 4, 4)) == (2, 4)
  assert artifacts.decoder_periods((2, 2, 1)) == (2,)
  assert artifacts.decoder_periods((1, 1, 1)) == ()

"""Learning-rate schedules read from a config's `optim` section."""

import ml_collections
import numpy as np
import pytest

from latentfm.train import schedules


def _optim(**kw):
  return ml_collections.ConfigDict(dict(lr=1e-3, **kw))


def test_default_is_the_plain_constant_rate():
  assert schedules.learning_rate(_optim(), 100) == 1e-3
  assert schedules.learning_rate(_optim(schedule="constant", warmup_steps=0), 100) == 1e-3


def test_warmup_then_cosine_to_the_final_fraction():
  lr = schedules.learning_rate(
    _optim(schedule="cosine", warmup_steps=10, final_lr_fraction=0.1), 110
  )
  values = np.array([float(lr(i)) for i in range(111)])
  np.testing.assert_allclose(values[[0, 5, 10]], [0.0, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(values[60], 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # half way down
  np.testing.assert_allclose(values[110], 1e-4, rtol=1e-5)
  assert np.all(np.diff(values[10:]) <= 1e-12)


def test_warmup_then_constant():
  lr = schedules.learning_rate(_optim(warmup_steps=4), 100)
  np.testing.assert_allclose([float(lr(i)) for i in (0, 2, 4, 99)], [0, 5e-4, 1e-3, 1e-3])


def test_bad_settings_name_the_key():
  with pytest.raises(ValueError, match="optim.schedule"):
    schedules.learning_rate(_optim(schedule="linear"), 10)
  with pytest.raises(ValueError, match="optim.warmup_steps"):
    schedules.learning_rate(_optim(warmup_steps=-1), 10)

"""The evaluation report's Markdown: every metric and its bracket, from `evaluate`'s output."""

import numpy as np

from latentfm.metrics import features, report


def test_to_markdown_lists_every_metric_with_its_bracket():
  rng = np.random.default_rng(0)
  volumes = lambda n: rng.random((n, 32, 32, 32)).astype(np.float32)
  result = report.evaluate(
    volumes(4), volumes(6), volumes(3), {"hist": features.intensity_histogram_features()}
  )
  text = report.to_markdown(result)
  rows = {
    line.split(" | ")[0].strip("| ↑↓"): line for line in text.splitlines() if line.startswith("| ")
  }
  for name in report.IMAGE_METRICS:
    entry = result["thesis_table"]["model"][name]
    low, high = entry["ci95"]
    assert low <= entry["mean"] <= high, name
    assert f"{entry['mean']:.4g} [{low:.3g}, {high:.3g}]" in rows[name]
  for name, entry in result["distribution"]["floor"].items():
    low, high = entry["ci95"]
    assert f"| {entry['value']:.4g} [{low:.3g}, {high:.3g}] |" in rows[name]
  assert text.index(report.SET_BRACKETS) > text.index("## Distribution")


def test_each_volume_set_is_featurised_once():
  rng = np.random.default_rng(1)
  sets = [rng.random((n, 16, 16, 16)).astype(np.float32) for n in (4, 6, 3)]
  calls = []
  hist = features.intensity_histogram_features()

  def counting(volumes):
    calls.append(len(volumes))
    return hist(volumes)

  result = report.evaluate(*sets, {"hist": counting})
  assert sorted(calls) == [3, 4, 6]  # samples, training set, held-out set: once each
  direct = report.evaluate(*sets, {"hist": hist})
  assert result["distribution"] == direct["distribution"]

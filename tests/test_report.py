"""The evaluation report's Markdown: every metric and its bracket, from `evaluate`'s output."""

import numpy as np

from latentfm.metrics import features, report


def test_to_markdown_lists_every_metric_with_its_bracket():
  rng = np.random.default_rng(0)
  volumes = lambda n: rng.random((n, 32, 32, 32)).astype(np.float32)
  result = report.evaluate(volumes(4), volumes(6), volumes(3),
                           {"hist": features.intensity_histogram_features()})
  text = report.to_markdown(result)
  rows = {line.split(" | ")[0].strip("| ↑↓"): line for line in text.splitlines()
          if line.startswith("| ")}
  for name in report.IMAGE_METRICS:
    entry = result["thesis_table"]["model"][name]
    low, high = entry["ci95"]
    assert low <= entry["mean"] <= high, name
    assert f"{entry['mean']:.4g} [{low:.3g}, {high:.3g}]" in rows[name]
  for name, entry in result["distribution"]["floor"].items():
    low, high = entry["ci95"]
    assert f"| {entry['value']:.4g} [{low:.3g}, {high:.3g}] |" in rows[name]
  assert text.index(report.SET_BRACKETS) > text.index("## Distribution")

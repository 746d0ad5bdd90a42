"""bench.fm_vs_ddpm's parts: the paired configs, the scorer, the table, the plot, bad input."""

import numpy as np
import pytest
from testing_support import blob_volume

from bench import fm_vs_ddpm
from experiments.configs import flow as flow_configs


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_the_two_runs_differ_only_in_objective_sampler_eta_and_rate():
  runs = fm_vs_ddpm.configs("demo", 40)
  fm, dm = (_flat(runs[o].to_dict()) for o in fm_vs_ddpm.OBJECTIVES)
  assert {k for k in fm if fm[k] != dm[k]} == {
    "flow.objective",
    "sample.solver",
    "sample.eta",
    "optim.lr",
  }
  assert dm["sample.eta"] == 1.0  # eta 0 carries the predictor's low-SNR error (latentfm.ddpm)
  assert dm["flow.objective"] == "ddpm" and fm["train.num_steps"] == 40
  assert fm["train.sample_every"] == 0 and fm["train.ckpt_every"] == 40
  reference = _flat(flow_configs.get_config("ddpm_demo").to_dict())
  assert {k for k in dm if dm[k] != reference[k]} <= {
    "train.num_steps",
    "train.sample_every",
    "train.ckpt_every",
    "train.tensorboard",
    "model.num_classes",
  }
  assert fm["model.num_classes"] == 0


def test_scorer_floor_and_ratio():
  volumes = np.stack([blob_volume((16, 16, 16), seed=i) / 160.0 for i in range(9)])
  train, held_out = volumes[:5], volumes[5:]
  calls = []

  def extract(v):
    calls.append(len(v))
    return np.stack(
      [v.mean(axis=(1, 2, 3)), v.std(axis=(1, 2, 3)), v[:, 8].mean(axis=(1, 2))], axis=1
    )

  scorer = fm_vs_ddpm.Scorer(train, held_out, extract)
  assert calls == [5, 4] and scorer.floor > 0
  same = scorer.score(held_out)
  assert same["fd_ratio"] == pytest.approx(1.0) and calls[-1] == 4
  blurred = scorer.score(held_out * 0.5)
  assert blurred["fd_ratio"] > 10 and blurred["w1_brain"] >= 0
  assert set(blurred) == {"fd", "fd_ratio", "w1_csf_fraction", "w1_ventricle_fraction", "w1_brain"}


def test_table_and_plot(tmp_path):
  curve = [
    {
      "objective": o,
      "step": s,
      "train_seconds": 10.0 * s,
      "sampler": "x",
      "nfe": 50,
      "fd": 2.0,
      "fd_ratio": 3.0 - s / 100,
    }
    for o in fm_vs_ddpm.OBJECTIVES
    for s in (1, 2)
  ]
  sweep = [
    {
      "objective": "rectified_flow",
      "step": 2,
      "sampler": f"euler (steps {n})",
      "nfe": n,
      "fd": 1.0,
      "fd_ratio": 2.0,
    }
    for n in (5, 10)
  ]
  text = fm_vs_ddpm.table(curve[:1])
  assert text.splitlines()[0].startswith("| objective | step | train_seconds |")
  assert text.splitlines()[2] == "| rectified_flow | 1 | 10.0 | x | 50 | 2 | 2.99 |  |  |  |"
  assert fm_vs_ddpm.plot(str(tmp_path / "p.png"), curve, sweep) == [
    "rectified_flow (euler-50)",
    "ddpm (ddim-50)",
  ]
  assert (tmp_path / "p.png").stat().st_size > 10_000
  ddpm_only = [r for r in curve if r["objective"] == "ddpm"]
  assert fm_vs_ddpm.plot(str(tmp_path / "d.png"), ddpm_only, []) == ["ddpm (ddim-50)"]


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
  (tmp_path / "rectified_flow" / "ckpt").mkdir(parents=True)
  with pytest.raises(SystemExit) as exit_info:
    fm_vs_ddpm.main(["--workdir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "already holds a run" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    fm_vs_ddpm.main(["--workdir", str(tmp_path), "--num_samples", "1"])
  assert exit_info.value.code == 2
  with pytest.raises(SystemExit) as exit_info:
    fm_vs_ddpm.main(["--workdir", str(tmp_path), "--objectives", "ddpm,score"])
  assert exit_info.value.code == 2

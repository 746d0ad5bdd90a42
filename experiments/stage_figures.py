"""The figures of the report's per-stage section (`experiments.stage_eval`).

`sweep_plot` (classifier accuracy against Fréchet distance over guidance weights),
`stage_montage` (samples per requested stage) and `edit_montage` (one subject's counterfactual
edits beside the true stages).
"""

from __future__ import annotations

import numpy as np


def sweep_plot(path: str, rows: list, floor: float) -> None:
  """Args: path: the PNG; rows: the sweep's {guidance, accuracy, fd} dicts; floor: the FD floor."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot([r["fd"] for r in rows], [r["accuracy"] for r in rows], "o-")
  for r in rows:
    ax.annotate(
      f"w={r['guidance']:g}",
      (r["fd"], r["accuracy"]),
      fontsize=8,
      xytext=(4, 4),
      textcoords="offset points",
    )
  ax.axvline(floor, color="k", ls="--", lw=1, label="FD floor (held-out real)")
  ax.set_xlabel("Fréchet distance to training set (lower is better)")
  ax.set_ylabel("stage classifier accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def stage_montage(path: str, volumes: np.ndarray, labels: np.ndarray) -> None:
  """Two samples per requested stage. Args: volumes `[N, D, H, W]`, their labels int `(N,)`."""
  # Not experiments.cohort: importing a command's module defines its flags a second time.
  from latentfm import viz  # pylint: disable=import-outside-toplevel
  from latentfm.data.cohort import STAGE_NAMES, VENTRICLE_LEVEL  # pylint: disable=import-outside-toplevel

  rows = [i for s in sorted(set(labels.tolist())) for i in np.flatnonzero(labels == s)[:2]]
  viz.save_triplanar(
    path,
    volumes[rows],
    [f"asked {STAGE_NAMES[labels[i]]}" for i in rows],
    title="samples per requested stage",
    at=VENTRICLE_LEVEL,
  )


def edit_montage(path: str, montage: dict) -> None:
  """Args: montage: `truth`, `edit`, `residual` (`[T, D, H, W]` each), `targets` (T stages) and
  `source` (the subject's stage), as `stage_eval.editing` returns it."""
  # Not experiments.cohort: importing a command's module defines its flags a second time.
  from latentfm import viz  # pylint: disable=import-outside-toplevel
  from latentfm.data.cohort import STAGE_NAMES, VENTRICLE_LEVEL  # pylint: disable=import-outside-toplevel

  source = STAGE_NAMES[montage["source"]]
  viz.save_grid(
    path,
    np.stack([montage["truth"], montage["edit"], montage["residual"]]),
    ["truth", "edit", "residual edit"],
    [f"{source}→{STAGE_NAMES[t]}" for t in montage["targets"]],
    title="counterfactual editing of one held-out subject",
    at=VENTRICLE_LEVEL,
  )

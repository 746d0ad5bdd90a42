"""Learning-rate schedules shared by both stages, read from a config's `optim` section.

Fields (all optional, so configs without them keep a constant rate and the same optimizer
state layout): `warmup_steps` (linear ramp from 0), `schedule` ("constant" or "cosine": after
the warm-up, a half cosine down to `final_lr_fraction` x `lr` at the last update).
Short CPU runs end far from a minimum of a noisy loss; annealing the rate lets them settle.
The cosine spans `train.num_steps`: resuming with another `num_steps` reshapes the rest of it.
"""

from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate(optim: ml_collections.ConfigDict, num_updates: int) -> float | optax.Schedule:
  """`optim.lr` as a float (no warm-up, constant) or an optax schedule over `num_updates`.

  Args:
    optim: the config's `optim` section (`lr`, optional `warmup_steps`, `schedule`,
      `final_lr_fraction`).
    num_updates: optimizer updates of the whole run (train steps / gradient accumulation).
  Returns:
    A float or a schedule `count -> lr`.
  """
  kind = optim.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
  warmup = int(optim.get("warmup_steps", 0))
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}")
  if kind == "constant" and warmup == 0:
    return float(optim.lr)
  lr = float(optim.lr)
  if kind == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )
  return optax.warmup_cosine_decay_schedule(
    0.0,
    lr,
    warmup,
    max(num_updates, warmup + 1),
    end_value=lr * float(optim.get("final_lr_fraction", 0.0)),
  )

"""One timing rule for every benchmark, JAX or PyTorch (no framework imported here)."""

import statistics
import time
from typing import Any, Callable


def timeit(
  fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = lambda out: out
) -> float:
  """Median wall time of `sync(fn())` over `repeats` calls, after one warm-up call.

  `sync` waits for the result: `jax.block_until_ready` for JAX's asynchronous dispatch,
  `torch.cuda.synchronize` on a GPU; identity for synchronous work.
  """
  sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)

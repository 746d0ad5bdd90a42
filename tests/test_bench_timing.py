"""bench.timing.timeit: one warm-up call, then the median of the timed calls, each synced."""

from bench import timing


def test_timeit_warms_up_once_syncs_every_call_and_takes_the_median(monkeypatch):
  clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # the timed calls take 1, 3 and 2 s
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
  calls, synced = [], []
  seconds = timing.timeit(lambda: calls.append(1) or len(calls), 3, sync=synced.append)
  assert seconds == 2.0
  assert len(calls) == 4 and synced == [1, 2, 3, 4]

"""bench.run's FLOP count, its report line and its ratio summary."""

import jax
import jax.numpy as jnp
import pytest

from bench import run


def test_compile_step_counts_the_flops_of_a_matrix_product():
  x, w = jnp.ones((64, 128)), jnp.ones((128, 32))
  compiled, flops = run.compile_step(lambda a, b: a @ b, x, w)
  assert flops == pytest.approx(2 * 64 * 128 * 32, rel=0.01)
  assert float(compiled(x, w)[0, 0]) == 128.0


def test_compile_step_counts_a_convolution():
  x, w = jnp.ones((2, 8, 8, 8, 4)), jnp.ones((3, 3, 3, 4, 6))
  conv = lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  _, flops = run.compile_step(conv, x, w)
  assert flops == pytest.approx(2 * 2 * 6**3 * 6 * 27 * 4, rel=0.01)


def test_report_gives_throughput_and_no_mfu_without_a_known_peak(capsys):
  row = run.report("step", 0.5, batch=4, flops=2e12)
  assert row["ms"] == pytest.approx(500.0)
  assert row["volumes_per_s"] == pytest.approx(8.0)
  assert row["tflops_per_s"] == pytest.approx(4.0)
  assert "mfu" not in row  # the CPU has no entry in PEAK_FLOPS
  assert "4.000 TFLOP/s" in capsys.readouterr().out


def test_peak_flops_of_an_h200_is_the_dense_bf16_rate(monkeypatch):
  class Device:
    device_kind = "NVIDIA H200"
  monkeypatch.setattr(jax, "devices", lambda: [Device()])
  assert run.peak_flops("bfloat16") == 989e12
  row = run.report("step", 1.0, batch=1, flops=98.9e12, dtype="bfloat16")
  assert row["mfu"] == pytest.approx(0.1)


def test_ratio_summary_pairs_the_rounds():
  assert run.ratio_summary([1.0, 3.0, 2.0], [2.0, 2.0, 4.0]) == (0.5, 0.5, 1.5)
  with pytest.raises(ValueError):
    run.ratio_summary([1.0], [1.0, 2.0])

"""The benchmarks' FLOP count, report line and ratio summary (bench.measure) and piece stages
(bench.stages)."""

import argparse

import jax
import jax.numpy as jnp
import pytest

from bench import measure, stages
from latentfm.nn import layers


def test_compile_step_counts_the_flops_of_a_matrix_product():
  x, w = jnp.ones((64, 128)), jnp.ones((128, 32))
  compiled, flops = measure.compile_step(lambda a, b: a @ b, x, w)
  assert flops == pytest.approx(2 * 64 * 128 * 32, rel=0.01)
  assert float(compiled(x, w)[0, 0]) == 128.0


def test_compile_step_counts_a_convolution():
  x, w = jnp.ones((2, 8, 8, 8, 4)), jnp.ones((3, 3, 3, 4, 6))
  conv = lambda a, b: jax.lax.conv_general_dilated(
    a, b, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  )
  _, flops = measure.compile_step(conv, x, w)
  assert flops == pytest.approx(2 * 2 * 6**3 * 6 * 27 * 4, rel=0.01)


def test_compile_step_counts_the_models_flops_whichever_formulation_runs():
  """A stride-2 convolution runs as space-to-depth and a stride-1 convolution over a zero-padded
  kernel on the CPU (3 taps padded to 4), which does more arithmetic; the count is that of the
  plain convolution."""
  x, w = jnp.ones((1, 9, 9, 9, 4)), jnp.ones((3, 3, 3, 4, 6))
  conv = lambda a, b: layers.conv(a, b, (2, 2, 2), ((0, 0),) * 3)
  plain = 2 * 4**3 * 3**3 * 4 * 6
  with layers.use_conv_impl("fast"):
    fast = jax.jit(conv).lower(x, w).cost_analysis()["flops"]
    compiled, flops = measure.compile_step(conv, x, w)
    assert layers.resolve_conv_impl() == "fast"
  assert fast > 1.2 * plain  # the fast formulation's own count
  assert flops == pytest.approx(plain, rel=0.01)
  assert compiled(x, w).shape == (1, 4, 4, 4, 6)


def test_report_puts_a_cpu_row_against_the_matmul_rate(monkeypatch, capsys):
  monkeypatch.setattr(measure, "cpu_matmul_rate", lambda dtype: 8e12)
  row = measure.report("step", 0.5, batch=4, flops=2e12)
  assert row["ms"] == pytest.approx(500.0)
  assert row["volumes_per_s"] == pytest.approx(8.0)
  assert row["tflops_per_s"] == pytest.approx(4.0)
  assert "mfu" not in row  # the CPU has no entry in PEAK_FLOPS
  assert row["of_matmul_rate"] == pytest.approx(0.5)
  assert "4.000 TFLOP/s  50% of the matmul rate" in capsys.readouterr().out


def test_cpu_matmul_rate_times_a_matrix_product(monkeypatch):
  assert measure.cpu_matmul_rate("float32", 128) > 1e6  # measured: at least a MFLOP/s
  monkeypatch.setattr(measure, "timeit", lambda fn, repeats: 0.25 if fn().shape == (64, 64) else 0)
  assert measure.cpu_matmul_rate.__wrapped__("float32", 64) == pytest.approx(2 * 64**3 / 0.25)


def test_peak_flops_of_an_h200_is_the_dense_bf16_rate(monkeypatch):
  class Device:
    device_kind = "NVIDIA H200"

  monkeypatch.setattr(jax, "devices", lambda: [Device()])
  assert measure.peak_flops("bfloat16") == 989e12
  row = measure.report("step", 1.0, batch=1, flops=98.9e12, dtype="bfloat16")
  assert row["mfu"] == pytest.approx(0.1)


@pytest.mark.parametrize(
  "kind, bf16",
  [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("Tesla T4", None),
  ],
)
def test_peak_flops_tells_the_h100_cards_apart(monkeypatch, kind, bf16):
  monkeypatch.setattr(jax, "devices", lambda: [type("Device", (), {"device_kind": kind})()])
  assert measure.peak_flops("bfloat16") == bf16


def test_ratio_summary_pairs_the_rounds():
  assert measure.ratio_summary([1.0, 3.0, 2.0], [2.0, 2.0, 4.0]) == (0.5, 0.5, 1.5)
  with pytest.raises(ValueError):
    measure.ratio_summary([1.0], [1.0, 2.0])


@pytest.mark.parametrize("stage", ["conv3", "resblock"])
def test_piece_stages_give_input_and_parameter_gradients_at_the_decoders_last_width(stage):
  args = argparse.Namespace(
    size=8, batch=1, dtype="float32", downsample=4, remat=False, recompute_norms=False
  )
  (work,) = {"conv3": stages.bench_conv3, "resblock": stages.bench_resblock}[stage](args)
  assert work.stage == stage and work.label.startswith(f"{stage} fwd+bwd 8^3x32 b1")
  param_grads, x_grad = work.call()
  assert x_grad.shape == (1, 8, 8, 8, stages.piece_width()) == (1, 8, 8, 8, 32)
  assert float(jnp.abs(x_grad).max()) > 0
  assert all(
    float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(param_grads) if g.ndim > 1
  )  # kernels and norm scales; a bias before a GroupNorm gets ~0
  assert set(stages.TORCH_STAGES) >= {stage}

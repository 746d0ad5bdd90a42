"""Class conditioning: the label embedding, label dropout, the CFG arithmetic, balanced labels,
cohort stage proportions and the per-stage metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import flow as flow_configs
from latentfm import flow, sample
from latentfm.data import cohort
from latentfm.metrics import stages as stage_metrics
from latentfm.metrics.features import tissue_volumes
from latentfm.nn.unet3d import UNet3D, count_params, timestep_embedding

THESIS_PARAMS = 37_910_568


def _tiny_unet(num_classes):
  return UNet3D(
    channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=2,
    time_embed_dim=16,
    norm_groups=4,
    num_classes=num_classes,
  )


def test_thesis_stays_unconditional_and_a_label_table_costs_its_size():
  c = flow_configs.get_config("thesis")
  assert c.model.num_classes == 0 and count_params(c) == THESIS_PARAMS
  c.model.num_classes = 4  # 4 classes + the null class, one 320-wide row each
  assert count_params(c) == THESIS_PARAMS + 5 * 320


def test_label_changes_the_field_and_none_is_the_null_class():
  net = _tiny_unet(3)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4, 2))
  t = jnp.array([0.3, 0.7])
  params = net.init(jax.random.PRNGKey(1), z, t)["params"]
  assert params["label_embed"]["embedding"].shape == (4, 16)
  # The output conv starts at zero; move it so that the label can show.
  params = jax.tree.map(lambda p: p + 0.05, params)
  out = lambda label: net.apply({"params": params}, z, t, label=label)
  a, b = out(jnp.array([0, 0])), out(jnp.array([2, 2]))
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(out(None), out(jnp.array([3, 3])))
  with pytest.raises(ValueError, match="unconditional"):
    _tiny_unet(0).init(jax.random.PRNGKey(1), z, t, label=jnp.array([0, 1]))


def test_label_embedding_starts_at_the_time_embeddings_scale():
  # A label table initialised far below the time embedding left the trained demo flow almost
  # blind to the stage; both must start comparable.
  net = _tiny_unet(4)
  z = jnp.zeros((5, 4, 4, 4, 2))
  t = jnp.linspace(0.0, 1.0, 5)
  params = net.init(jax.random.PRNGKey(1), z, t)["params"]
  d0, d1 = params["time_mlp_0"], params["time_mlp_1"]
  temb = timestep_embedding(t * net.time_scale, net.channels) @ d0["kernel"] + d0["bias"]
  temb = jax.nn.silu(temb) @ d1["kernel"] + d1["bias"]
  time_norm = float(jnp.linalg.norm(temb, axis=1).mean())
  label_norm = float(jnp.linalg.norm(params["label_embed"]["embedding"], axis=1).mean())
  assert 0.3 < label_norm / time_norm < 10


def test_drop_labels_rate_and_extremes():
  labels = jnp.zeros((20_000,), jnp.int32) + 2
  dropped = flow.drop_labels(jax.random.PRNGKey(0), labels, 0.1, 4)
  assert set(np.unique(dropped).tolist()) == {2, 4}
  assert abs(float(jnp.mean(dropped == 4)) - 0.1) < 0.01
  np.testing.assert_array_equal(flow.drop_labels(jax.random.PRNGKey(0), labels, 0.0, 4), labels)
  assert (flow.drop_labels(jax.random.PRNGKey(0), labels, 1.0, 4) == 4).all()


def test_conditional_loss_needs_labels_and_drops_them_only_in_training():
  seen = []

  def apply_fn(variables, z, t, train, rngs, label):
    seen.append(label)
    return jnp.zeros_like(z) + variables["params"]

  cfg = {"loss": "l2", "time_sampling": "uniform", "p_uncond": 1.0}
  loss_fn = flow.make_fm_loss_fn(apply_fn, cfg, num_classes=3)
  z0 = jnp.ones((2, 2, 2, 2, 1))
  with pytest.raises(ValueError, match="labels"):
    loss_fn(0.0, z0, jax.random.PRNGKey(0))
  loss_fn(0.0, z0, jax.random.PRNGKey(0), labels=jnp.array([0, 1]))
  loss_fn(0.0, z0, jax.random.PRNGKey(0), train=False, labels=jnp.array([0, 1]))
  np.testing.assert_array_equal(seen[0], [3, 3])  # p_uncond 1: all null while training
  np.testing.assert_array_equal(seen[1], [0, 1])
  with pytest.raises(ValueError, match="p_uncond"):
    flow.make_fm_loss_fn(apply_fn, dict(cfg, p_uncond=1.5), num_classes=3)


def test_guided_field_is_the_cfg_combination_from_one_batched_call():
  # v(z, t, label) = table[label]: constant in z and t, so Euler from t = 1 to 0 is exact.
  table = jnp.array([1.0, -2.0, 5.0, 0.5])  # classes 0..2, null class 3
  batches = []

  def apply_fn(variables, z, t, train, label):
    batches.append(z.shape[0])
    return jnp.broadcast_to(variables["params"][label].reshape(-1, 1, 1), z.shape)

  z1 = jnp.zeros((2, 3, 3))
  labels = jnp.array([0, 2])
  for w in (0.0, 1.0, 2.5):
    velocity = sample.velocity_from_model(apply_fn, table, labels=labels, guidance=w, null_label=3)
    z0, nfe = sample.integrate(velocity, z1, steps=4)
    v_u, v_c = table[3], table[labels]
    expected = -(v_u + w * (v_c - v_u))  # z0 = z1 - v (t runs from 1 to 0)
    np.testing.assert_allclose(z0[:, 0, 0], expected, rtol=1e-6)
    assert int(nfe) == 4  # one guided evaluation counts once ...
  assert batches and set(batches) == {4}  # ... and is one network call on the doubled batch
  with pytest.raises(ValueError, match="null_label"):
    sample.velocity_from_model(apply_fn, table, labels=labels)


def test_balanced_labels_counts():
  labels = sample.balanced_labels(10, 4)
  assert labels.dtype == np.int32 and len(labels) == 10
  np.testing.assert_array_equal(np.bincount(labels), [3, 3, 2, 2])
  np.testing.assert_array_equal(np.bincount(sample.balanced_labels(8, 4)), [2, 2, 2, 2])
  with pytest.raises(ValueError, match="conditional"):
    sample.balanced_labels(4, 0)


def test_cohort_stage_proportions():
  thesis = cohort.cohort_stages(100, seed=0, proportions=(0.0, 0.01, 0.29, 0.70))
  np.testing.assert_array_equal(np.bincount(thesis, minlength=4), [0, 1, 29, 70])
  assert not np.array_equal(thesis, np.sort(thesis))  # shuffled ...
  np.testing.assert_array_equal(thesis, cohort.cohort_stages(100, 0, (0, 0.01, 0.29, 0.7)))
  np.testing.assert_array_equal(
    np.bincount(cohort.cohort_stages(7, 1, (1, 1, 1, 1))), [2, 2, 2, 1]
  )  # largest remainder: counts sum to n
  np.testing.assert_array_equal(cohort.cohort_stages(6), [0, 1, 2, 3, 0, 1])  # round robin
  for bad in ((1, 1), (-1, 1, 1, 1), (0, 0, 0, 0)):
    with pytest.raises(ValueError, match="proportions"):
      cohort.cohort_stages(10, 0, bad)


def test_write_cohort_with_proportions(tmp_path):
  d = str(tmp_path / "c")
  cohort.write_cohort(d, 6, (16, 16, 16), seed=2, proportions=(0, 0, 1, 2))
  rows = (tmp_path / "c" / "manifest.csv").read_text().splitlines()[1:]
  assert sorted(int(r.split(",")[1]) for r in rows) == [2, 2, 3, 3, 3, 3]
  cohort.write_cohort(d, 6, (16, 16, 16), seed=2, proportions=(0, 0, 1, 2))  # reused
  with pytest.raises(cohort.VolumeError, match="refusing"):
    cohort.write_cohort(d, 6, (16, 16, 16), seed=2)  # balanced: another cohort


@pytest.fixture(scope="module")
def real32():
  return cohort.make_cohort(40, (32, 32, 32), seed=0)


def test_stage_classifier_and_per_stage_morphometry_on_real_stages(real32):
  volumes, labels = real32
  features = stage_metrics.stage_features(volumes)
  assert features.shape == (40, 2 + len(stage_metrics.DEPTHS))
  assert stage_metrics.cross_validated_accuracy(features, labels) >= 0.5  # chance: 0.25
  shuffled = np.random.default_rng(0).permutation(labels)
  assert stage_metrics.cross_validated_accuracy(features, shuffled) < 0.45
  # Real volumes of each stage standing in for samples: their means are ordered like the data.
  half = np.arange(40) // 4 % 2 == 0  # every stage in both halves
  per_stage = stage_metrics.per_stage_morphometry(
    volumes[half], labels[half], volumes[~half], labels[~half]
  )
  assert sorted(per_stage) == [0, 1, 2, 3]
  vent = [per_stage[s]["ventricle_fraction"]["real"]["mean"] for s in range(4)]
  assert vent == sorted(vent)  # atrophy enlarges the ventricles
  assert stage_metrics.ordered_like(per_stage, "ventricle_fraction")
  swapped = {s: per_stage[3 - s] for s in range(4)}
  for s in range(4):
    swapped[s] = {
      k: dict(swapped[s][k], real=per_stage[s][k]["real"]) for k in stage_metrics.MEASURES
    }
  assert not stage_metrics.ordered_like(swapped, "ventricle_fraction")


def test_ordered_chance_is_one_for_separate_stages_and_a_permutation_for_equal_ones():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 50)
  separate = labels * 10.0 + rng.normal(0, 1, 200)
  assert stage_metrics.ordered_chance(separate, labels, 2) == 1.0
  # The same values in every stage: any of the 4! orders is as likely, so about 1 / 24.
  same = np.tile(rng.normal(0, 1, 50), 4)
  assert abs(stage_metrics.ordered_chance(same, labels, 4, draws=20000) - 1 / 24) < 0.01
  # Overlapping stages: more samples per stage make the order more certain.
  overlap = labels * 0.5 + rng.normal(0, 1, 200)
  chances = [stage_metrics.ordered_chance(overlap, labels, n) for n in (1, 4, 16)]
  assert chances[0] < chances[1] < chances[2] < 1.0


def test_edit_metrics_against_truth(real32):
  volumes, labels = real32
  template = cohort.load_template((32, 32, 32))
  seeds = cohort.subject_seeds(40, 0)
  source = volumes[:3]  # stages 0, 1, 2
  truth = np.stack([cohort.make_subject(template, 3, int(k)) for k in seeds[:3]])
  m = stage_metrics.edit_metrics(truth, source, truth)  # a perfect edit
  assert m["psnr"]["edit"]["mean"] > 60 and m["ssim"]["edit"]["mean"] > 0.999
  assert m["psnr"]["unedited"]["mean"] < 40
  np.testing.assert_allclose(
    m["ventricle_shift"]["edit"]["mean"], m["ventricle_shift"]["truth"]["mean"]
  )
  assert m["ventricle_shift"]["truth"]["mean"] > 0  # stage 3 has larger ventricles
  assert m["shift_gain"] == pytest.approx(1.0)
  assert stage_metrics.edit_metrics(source, source, truth)["shift_gain"] == 0.0  # no change
  shrunk = np.stack([cohort.make_subject(template, 0, int(k)) for k in seeds[1:3]])
  assert stage_metrics.edit_metrics(shrunk, source[1:], truth[1:])["shift_gain"] < 0  # wrong way
  # One perfect edit and two unedited scans: the slope weighs each by its true shift squared.
  part = stage_metrics.edit_metrics(np.stack([truth[0], *source[1:]]), source, truth)
  v = {k: tissue_volumes(x)["ventricle_fraction"] for k, x in (("s", source), ("t", truth))}
  true_shift = v["t"] - v["s"]
  assert 0 < part["shift_gain"] < 1
  assert part["shift_gain"] == pytest.approx(true_shift[0] ** 2 / np.sum(true_shift**2))


def test_edited_subjects_cover_the_stages_first():
  from experiments.stage_eval import _round_robin  # pylint: disable=import-outside-toplevel

  labels = np.array([0, 0, 1, 3, 1, 2])
  np.testing.assert_array_equal(_round_robin(labels, 4), [0, 2, 5, 3])  # one of each stage
  np.testing.assert_array_equal(_round_robin(labels, 0), [0, 2, 5, 3, 1, 4])  # all

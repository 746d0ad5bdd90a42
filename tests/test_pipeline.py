"""Both stages end to end on a tiny cohort (16³): training, resume, sampling API, NIfTI output."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_support import tiny_flow, tiny_vqgan_config

from experiments import flow as flow_stage
from experiments import sample as sample_cli
from experiments import vqgan as vqgan_stage
from latentfm import sample
from latentfm.data import geometry
from latentfm.data.io import read_volume
from latentfm.flow import normalize
from latentfm.nn.vqgan import to_model_range
from latentfm.train.writer import read_metrics


def tiny_vqgan(num_steps):
  c = tiny_vqgan_config(discriminator_start=1000)
  c.train.num_steps = num_steps
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.image_every = 2
  c.train.ckpt_every = 2
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  vqgan_stage.train_and_evaluate(tiny_vqgan(2), str(root / "vqgan"))
  flow_stage.train_and_evaluate(tiny_flow(root / "vqgan"), str(root / "flow"))
  return root


def test_flow_balances_classes_when_asked(trained, tmp_path, monkeypatch):
  class Drawn(Exception):
    pass

  def spy(dataset):
    raise Drawn(dataset.labels)

  monkeypatch.setattr(flow_stage.loader, "class_balanced", spy)
  c = tiny_flow(trained / "vqgan")
  c.flow.balance_classes = True
  with pytest.raises(Drawn):
    flow_stage.train_and_evaluate(c, str(tmp_path / "flow"))


def test_vqgan_outputs_and_resume(trained):
  vq = trained / "vqgan"
  rows = read_metrics(str(vq))
  assert rows[0]["step"] == 0 and "val_psnr" in rows[0]
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert {"l1", "commitment", "perplexity", "live_codes", "val_ssim"} <= set(rows[-1])
  assert (vq / "images" / "recon_000002.png").is_file() and (vq / "config.json").is_file()
  assert (vq / "cohort" / "manifest.csv").is_file()
  vqgan_stage.train_and_evaluate(tiny_vqgan(3), str(vq))  # resumes at step 2
  assert [r["step"] for r in read_metrics(str(vq))] == [0, 1, 2, 3]


def test_flow_outputs(trained):
  fl = trained / "flow"
  rows = read_metrics(str(fl))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert np.isfinite(rows[-1]["loss"]) and rows[-1]["sample_nfe"] == 4
  assert (fl / "images" / "samples_000003.png").is_file()
  with np.load(fl / "latents.npz") as f:  # the 6 training volumes and their mirror images
    latents, flips, labels = f["latents"], tuple(f["flip_axes"]), f["labels"]
  assert latents.shape == (12, 8, 8, 8, 8) and flips == (2,)
  # The manifest's stages reach the latent dataset, mirror images keeping their subject's.
  from latentfm.data import loader

  vq_config = tiny_vqgan(2)
  train, _ = loader.load_splits(vq_config.data, str(trained / "vqgan"), vq_config.seed)
  assert len(set(train.labels.tolist())) > 1
  np.testing.assert_array_equal(labels, np.tile(train.labels, 2))
  assert not np.allclose(latents[:6], latents[6:])
  config = tiny_flow(trained / "vqgan")
  config.flow.flip_latents = False
  with pytest.raises(ValueError, match="flip_latents"):
    flow_stage.prepare_latents(config, str(fl), True)


def test_sampling_api(trained, tmp_path):
  models = sample.load(str(trained / "flow"))
  assert models.latent_shape == (8, 8, 8, 8) and models.flow_step == 3
  volumes, nfe = sample.sample(jax.random.PRNGKey(0), models, 3, steps=4, batch_size=2)
  assert volumes.shape == (3, 16, 16, 16) and nfe == 4
  assert 0.0 <= volumes.min() and volumes.max() <= 1.0
  again, _ = sample.sample(jax.random.PRNGKey(0), models, 3, steps=4, batch_size=2)
  np.testing.assert_array_equal(volumes, again)
  snapped, _ = sample.sample(jax.random.PRNGKey(0), models, 1, steps=4, snap_to_codebook=True)
  assert snapped.shape == (1, 16, 16, 16)
  noise, nfe = sample.encode_to_noise(models, volumes[:2], solver="euler", steps=4)
  assert noise.shape == (2, 8, 8, 8, 8) and int(nfe) == 4
  paths = sample.write_samples(str(tmp_path), volumes)
  vol = read_volume(paths[0])
  assert vol.spacing == (1.0, 1.0, 1.0)
  np.testing.assert_allclose(vol.array, volumes[0], atol=1e-6)
  assert (tmp_path / "samples.png").is_file()


def test_sample_command(trained, tmp_path, capsys):
  sample_cli.run(
    str(trained / "flow"), out=str(tmp_path / "s"), num=2, seed=0, solver="euler", steps=4
  )
  assert sorted(os.listdir(tmp_path / "s")) == [
    "sample_0000.nii.gz",
    "sample_0001.nii.gz",
    "samples.png",
  ]
  # Written with the VQ-GAN's training data geometry: the cohort's voxels, cropped to the
  # head and resized to 16³, are several mm wide; the centre of the volume is at 0 mm.
  recorded = geometry.read(str(trained / "vqgan"))
  assert recorded.num_volumes == 6 and all(s > 5.0 for s in recorded.spacing)
  vol = read_volume(str(tmp_path / "s" / "sample_0000.nii.gz"))
  np.testing.assert_allclose(vol.spacing, recorded.spacing, rtol=1e-6)
  np.testing.assert_allclose(vol.direction, recorded.direction, atol=1e-6)
  centre = np.asarray(vol.direction).reshape(3, 3) @ (7.5 * np.asarray(vol.spacing))
  np.testing.assert_allclose(np.asarray(vol.origin) + centre, 0.0, atol=1e-3)
  assert (
    f"voxel size {' x '.join(f'{s:.3g}' for s in recorded.spacing)} mm" in capsys.readouterr().out
  )


def test_conditional_sampling_and_editing(trained):
  models = sample.load(str(trained / "flow"))
  assert models.num_classes == 4  # the demo recipe is conditioned on the cohort's stages
  key = jax.random.PRNGKey(0)
  a, _ = sample.sample(key, models, 2, labels=[0, 3], guidance=2.0, steps=4)
  b, _ = sample.sample(key, models, 2, labels=[3, 0], guidance=2.0, steps=4)
  c, _ = sample.sample(key, models, 2, labels=[0, 3], guidance=2.0, steps=4)
  np.testing.assert_array_equal(a, c)
  assert np.abs(a - b).max() > 0  # the label reaches the field
  for bad, match in (([0, 4], "0..3"), ([0], "2 integers"), (1.5, "integers")):
    with pytest.raises(ValueError, match=match):
      sample.sample(key, models, 2, labels=bad, steps=4)
  edited, nfe = sample.edit(models, a, [0, 3], [3, 0], steps=4, solver="euler")
  assert edited.shape == a.shape and nfe == 8 and 0 <= edited.min() and edited.max() <= 1
  # A shallow inversion hardly moves the latent: the edit is the autoencoder's round trip.
  light, _ = sample.edit(models, a, [0, 3], [3, 0], steps=4, solver="euler", strength=1e-3)
  z = models.vqgan.apply(
    models.vqgan_variables, to_model_range(jnp.asarray(a)[..., None]), method=models.vqgan.encode
  )
  round_trip = np.asarray(sample.decode(models, normalize(z, models.stats)))
  np.testing.assert_allclose(light, round_trip, atol=2e-3)
  # With a field that is table[label] everywhere, inverting under the source label adds
  # table[source] and generating under the target subtracts table[target] (Euler is exact).
  table = jnp.array([0.0, 0.5, -0.5, 1.0, 0.0])  # classes 0..3, null class 4
  toy = lambda variables, z, t, train, label: jnp.broadcast_to(
    variables["params"][label].reshape(-1, 1, 1, 1, 1), z.shape
  )
  toy_models = dataclasses.replace(
    models, velocity=sample.velocity_from_model(toy, table, null_label=4)
  )
  full = {"steps": 4, "solver": "euler", "strength": 1.0, "guidance": 1.0}
  edited, _ = sample.edit(toy_models, a, [1, 3], [2, 0], **full)
  shift = (table[jnp.array([1, 3])] - table[jnp.array([2, 0])]).reshape(-1, 1, 1, 1, 1)
  expected = np.asarray(sample.decode(models, normalize(z, models.stats) + shift))
  np.testing.assert_allclose(edited, expected, atol=1e-4)
  # Inverting to t = 0.5 adds half of table[source]; guidance 2 doubles the way back's field.
  partial, _ = sample.edit(
    toy_models, a, [1, 3], [2, 0], **{**full, "strength": 0.5, "guidance": 2}
  )
  shift = 0.5 * (table[jnp.array([1, 3])] - 2 * table[jnp.array([2, 0])]).reshape(-1, 1, 1, 1, 1)
  expected = np.asarray(sample.decode(models, normalize(z, models.stats) + shift))
  np.testing.assert_allclose(partial, expected, atol=1e-4)
  # A residual edit adds to the scan the difference of the decodings under target and source.
  kept, nfe = sample.edit(toy_models, a, [1, 3], [2, 3], residual=True, **full)
  assert nfe == 8
  shift = (table[jnp.array([1, 3])] - table[jnp.array([2, 3])]).reshape(-1, 1, 1, 1, 1)
  back = normalize(z, models.stats) + shift
  expected = np.clip(a + sample.decode(models, back) - round_trip, 0, 1)
  np.testing.assert_allclose(kept[0], expected[0], atol=1e-4)
  np.testing.assert_allclose(kept[1], a[1], atol=1e-5)  # its own class: the scan itself
  with pytest.raises(ValueError, match="strength"):
    sample.edit(models, a, 0, 1, strength=0.0)


def test_sample_command_balanced(trained, tmp_path):
  sample_cli.run(
    str(trained / "flow"), out=str(tmp_path / "s"), num=6, steps=4, balanced=True, guidance=2.0
  )
  rows = (tmp_path / "s" / "labels.csv").read_text().splitlines()
  assert rows[0] == "file,label" and [r.split(",")[1] for r in rows[1:]] == list("001123")
  assert (tmp_path / "s" / "sample_0005_class3.nii.gz").is_file()
  with pytest.raises(ValueError, match="exclude"):
    sample_cli.run(str(trained / "flow"), out=str(tmp_path / "t"), num=2, label=1, balanced=True)


def test_quickstart_notebook_runs(trained, tmp_path, monkeypatch):
  """experiments/notebooks/quickstart.ipynb executes without error on the tiny pipeline."""
  nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extra")
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name, value in {
    "LATENTFM_WORKDIR": str(trained / "flow"),
    "LATENTFM_STEPS": "4",
    "LATENTFM_OUT": str(tmp_path),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": root,
    "MPLBACKEND": "Agg",
  }.items():
    monkeypatch.setenv(name, value)
  notebook = nbformat.read(
    os.path.join(root, "experiments", "notebooks", "quickstart.ipynb"), as_version=4
  )
  NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": root}}
  ).execute()
  printed = "".join(
    o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "latent (8, 8, 8, 8) -> volume (16, 16, 16)" in printed and "NFE 4" in printed
  assert "stage " in printed and "round trip mean |error|" in printed
  assert len(os.listdir(tmp_path / "samples")) == 3  # two NIfTI files and the montage


def test_evaluate_report(trained):
  from experiments import evaluate

  markdown = evaluate.run(
    str(trained / "flow"),
    num_samples=4,
    solver="euler",
    steps=4,
    seed=0,
    per_stage=1,
    edit_subjects=1,
    stage_samples=2,
    edit_guidance=2.0,
    edit_strength=0.5,
  )
  report = json.loads((trained / "flow" / "eval" / "report.json").read_text())
  assert report["sizes"] == {"samples": 4, "train": 6, "held_out": 2}
  assert set(report["thesis_table"]["model"]) == {"mse", "nmse", "psnr", "ssim", "ms_ssim"}
  assert report["thesis_table"]["thesis"]["psnr"] == 21.0
  assert {"fd_vgg25d", "kid_vgg25d", "fd_random"} <= set(report["distribution"]["floor"])
  assert report["headline_features"] == "vgg25d" and "Headline (vgg25d features)" in markdown
  assert set(report["reconstruction"]) >= {"psnr", "ssim", "checkerboard_p2"}
  assert "| psnr ↑ |" in markdown and "VQ-GAN reconstruction" in markdown
  assert "Volumes of voxel size" in markdown and report["geometry"]["num_volumes"] == 6
  for name in (
    "report.md",
    "samples.png",
    "distances.png",
    "guidance.png",
    "stages.png",
    "editing.png",
  ):
    assert (trained / "flow" / "eval" / name).is_file()
  stages = report["stages"]
  assert [r["guidance"] for r in stages["sweep"]] == [0.0, 1.0, 2.0, 4.0]
  assert all(0 <= r["accuracy"] <= 1 and r["fd"] > 0 for r in stages["sweep"])
  assert sorted(stages["per_stage"]) == [str(s) for s in stages["classes"]]
  # The morphometry has stage_samples per stage, the sweep per_stage at each weight.
  assert stages["stage_samples"] == 2 and stages["per_stage_samples"] == 1
  assert {m["ventricle_fraction"]["model"]["n"] for m in stages["per_stage"].values()} == {2}
  assert "at w = 1, 2 samples per stage" in markdown
  assert set(stages["editing"]) == {
    "edit", "residual", "round_trip", "solver", "guidance", "strength", "nfe", "subjects"
  }  # fmt: skip
  assert (stages["editing"]["guidance"], stages["editing"]["strength"]) == (2.0, 0.5)
  # edit_subjects=1 of the 2 held-out scans: that scan edited to the other classes only.
  assert stages["editing"]["subjects"] == 1
  assert stages["editing"]["edit"]["psnr"]["edit"]["n"] == len(stages["classes"]) - 1
  assert stages["editing"]["residual"]["psnr"]["edit"]["n"] == len(stages["classes"]) - 1
  assert "| residual edit vs truth |" in markdown
  assert set(stages["ordered_chance"]) == {"csf_fraction", "ventricle_fraction"}
  assert all(0 <= v <= 1 for v in stages["ordered_chance"].values())
  assert "of draws, the most this check can show" in markdown
  assert (
    "editing of 1 held-out scans to every other stage (inverted to t = 0.5 and regenerated "
    "at w = 2 with euler" in markdown
  )
  assert "## Per stage" in markdown and "| guidance w |" in markdown


def test_api_checks_inputs_against_the_model(trained):
  models = sample.load(str(trained / "flow"))
  assert sample.volume_shape(models) == (16, 16, 16)
  with pytest.raises(ValueError, match=r"volumes must have shape \[N, 16, 16, 16\].*32, 32, 32"):
    sample.encode_to_noise(models, np.zeros((1, 32, 32, 32)))
  with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[0, 255\]"):
    sample.encode_to_noise(models, np.linspace(0, 255, 16**3).reshape(1, 16, 16, 16))
  with pytest.raises(ValueError, match=r"got \[-0.5"):
    sample.encode_to_noise(models, np.full((1, 16, 16, 16), -0.5))
  with pytest.raises(ValueError, match=r"z0 must have shape \[N, 8, 8, 8, 8\]"):
    sample.decode(models, np.zeros((1, 4, 4, 4, 8)))
  with pytest.raises(ValueError, match="batch_size must be positive"):
    sample.sample(jax.random.PRNGKey(0), models, 2, batch_size=0)
  with pytest.raises(ValueError, match="max_steps=3"):
    sample.sample(jax.random.PRNGKey(0), models, 1, steps=4, max_steps=3)


def test_wrong_stage_workdirs_are_named(trained):
  with pytest.raises(ValueError, match="is a vqgan workdir, but a flow workdir is needed"):
    sample.load(str(trained / "vqgan"))
  with pytest.raises(ValueError, match="is a flow workdir, but a vqgan workdir is needed"):
    sample.load(str(trained / "flow"), vqgan_workdir=str(trained / "flow"))


def test_workdirs_work_from_anywhere_and_move_together(trained, tmp_path, monkeypatch):
  stored = json.loads((trained / "flow" / "config.json").read_text())["vqgan_workdir"]
  assert stored == os.path.join("..", "vqgan")
  moved = tmp_path / "moved"
  moved.mkdir()
  for stage in ("vqgan", "flow"):
    shutil.copytree(trained / stage, moved / stage, ignore=shutil.ignore_patterns(".lock"))
  monkeypatch.chdir(tmp_path)
  models = sample.load(os.path.join("moved", "flow"))
  assert models.flow_step == 3 and models.latent_shape == (8, 8, 8, 8)


def tiny_ddpm(vq_dir, num_steps):
  """`tiny_flow` under the DDPM objective at a constant rate (a resume may change num_steps)."""
  c = tiny_flow(vq_dir, num_steps)
  c.flow.objective = "ddpm"
  c.ddpm.num_timesteps = 20
  c.optim.warmup_steps, c.optim.schedule = 0, "constant"
  c.train.ckpt_every, c.train.sample_every = 2, 4
  c.sample.solver, c.sample.steps = "ddim", 5
  return c


@pytest.mark.slow
def test_ddpm_resumed_run_matches_uninterrupted_and_samples(trained, tmp_path):
  full, part = tmp_path / "full", tmp_path / "part"
  flow_stage.train_and_evaluate(tiny_ddpm(trained / "vqgan", 4), str(full))
  flow_stage.train_and_evaluate(tiny_ddpm(trained / "vqgan", 2), str(part))
  flow_stage.train_and_evaluate(tiny_ddpm(trained / "vqgan", 4), str(part))  # resumes at 2
  rows = read_metrics(str(full))
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["sample_nfe"] == 5
  # Every loss: params, Adam, EMA, data order and noise resumed (the 2-step run also previewed
  # samples at its last step).
  assert [{k: v for k, v in r.items() if k != "sample_nfe"} for r in read_metrics(str(part))] == [
    {k: v for k, v in r.items() if k != "sample_nfe"} for r in rows
  ]

  models = sample.load(str(full))
  assert models.objective == "ddpm" and models.schedule.num_timesteps == 20
  with np.load(full / "latents.npz") as f:  # z0 is clipped to the normalised latents' range
    latents = f["latents"]
  normalised = (latents - models.stats.mean) / models.stats.std
  assert float(models.schedule.clip_z0) == pytest.approx(np.abs(normalised).max(), rel=1e-4)
  volumes, nfe = sample.sample(jax.random.PRNGKey(0), models, 2, solver="ddim", steps=10)
  assert volumes.shape == (2, 16, 16, 16) and nfe == 10
  volumes, nfe = sample.sample(jax.random.PRNGKey(0), models, 2)
  assert np.isfinite(volumes).all() and nfe == 20  # ancestral over all steps, the default
  with pytest.raises(ValueError, match="does not sample a ddpm model"):
    sample.sample(jax.random.PRNGKey(0), models, 1, solver="euler")
  with pytest.raises(ValueError, match="does not sample a rectified_flow model"):
    sample.sample(jax.random.PRNGKey(0), sample.load(str(trained / "flow")), 1, solver="ddim")
  sample_cli.run(str(full), out=str(tmp_path / "s"), num=1, seed=0, steps=4, eta=1.0)
  assert (tmp_path / "s" / "sample_0000.nii.gz").is_file()


def test_flow_rejects_unknown_objective_and_mismatched_sampler(trained):
  c = tiny_ddpm(trained / "vqgan", 2)
  flow_stage.validate_config(c)
  c.flow.objective = "score"
  with pytest.raises(ValueError, match="flow.objective 'score'"):
    flow_stage.validate_config(c)
  c = tiny_ddpm(trained / "vqgan", 2)
  c.sample.solver = "euler"
  with pytest.raises(ValueError, match="'euler' does not sample a ddpm model"):
    flow_stage.validate_config(c)
  c.sample.solver, c.sample.steps = "ddim", 21
  with pytest.raises(ValueError, match="sample.steps 21"):
    flow_stage.validate_config(c)

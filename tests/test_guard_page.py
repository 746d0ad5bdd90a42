"""Steps read no memory outside their input buffers, checked by placing a batch next to a page
that faults on any access.

XLA:CPU (jaxlib 0.10.2) compiles `pad(x * 2 - 1)` of a one-channel volume with padding 2, the
3D discriminator's first layer on a real batch, into a kernel that loads vector lanes past the
end of `x`; the VQ-GAN train step then crashed whenever the batch buffer ended next to an
unmapped page. `latentfm.nn.vqgan.to_model_range` avoids that kernel. The bug needs LLVM's
optimisations, so the children compile with XLA's defaults, not the suite's fast-compile flags.
"""

import ctypes
import mmap
import os
import platform
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from testing_support import FAST_COMPILE_XLA_FLAGS

from latentfm.nn.vqgan import from_model_range, to_model_range

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="needs mmap/mprotect")


def guarded_array(shape: tuple[int, ...], side: str) -> np.ndarray:
  """A float32 array whose data ends ("after") or starts ("before") at a PROT_NONE page."""
  libc = ctypes.CDLL("libc.so.6", use_errno=True)
  libc.mmap.restype = ctypes.c_void_p
  libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
  ]
  libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  nbytes = int(np.prod(shape)) * 4
  pages = -(-nbytes // mmap.PAGESIZE) + 1
  base = libc.mmap(
    None,
    pages * mmap.PAGESIZE,
    mmap.PROT_READ | mmap.PROT_WRITE,
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
    -1,
    0,
  )
  if side == "after":
    guard, start = base + (pages - 1) * mmap.PAGESIZE, base + (pages - 1) * mmap.PAGESIZE - nbytes
  else:
    guard, start = base, base + mmap.PAGESIZE
  if libc.mprotect(guard, mmap.PAGESIZE, 0) != 0:  # PROT_NONE
    raise OSError(ctypes.get_errno(), "mprotect failed")
  return np.frombuffer((ctypes.c_char * nbytes).from_address(start), np.float32).reshape(shape)


CHILD = """
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {tests!r})
from test_guard_page import guarded_array
from testing_support import tiny_vqgan_config
from latentfm.nn.vqgan import to_model_range
what, side, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
host = guarded_array((2, size, size, size, 1), side)
host[...] = np.random.default_rng(0).random(host.shape, dtype=np.float32)
x = jax.dlpack.from_dlpack(host)  # zero-copy: XLA reads the guarded memory itself
assert x.unsafe_buffer_pointer() == host.ctypes.data, "not zero-copy"
if what == "pad":
  out = jax.jit(lambda v: jnp.pad(to_model_range(v), [(0, 0)] + [(2, 2)] * 3 + [(0, 0)]))(x)
  print(float(out.sum()))
else:
  from latentfm.train.vqgan_step import create_state, make_train_step
  config = tiny_vqgan_config()
  config.data.shape = (size,) * 3
  state = create_state(jax.random.PRNGKey(0), config)
  _, metrics = jax.jit(make_train_step(config, use_gan=True))(state, {{"image": x}}, None)
  print(float(metrics["d_loss"]))
"""


def run_child(what: str, side: str, size: int) -> subprocess.CompletedProcess:
  # The suite's fast-compile settings (conftest) change the generated code: the child gets XLA's
  # default emitters and optimisation level (3), the code users run.
  flags = " ".join(
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not any(name in f for name in FAST_COMPILE_XLA_FLAGS)
  )
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=(flags + " --xla_backend_optimization_level=3").strip(),
  )
  code = CHILD.format(tests=os.path.join(ROOT, "tests"))
  return subprocess.run(
    [sys.executable, "-c", code, what, side, str(size)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.parametrize("side", ["after", "before"])
def test_padded_model_input_stays_inside_batch(side):
  result = run_child("pad", side, 32)
  assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
  float(result.stdout.split()[-1])


@pytest.mark.slow
def test_vqgan_gan_step_stays_inside_batch():
  result = run_child("step", "after", 32)
  assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
  assert np.isfinite(float(result.stdout.split()[-1]))


def test_model_range_round_trip_matches_affine_map():
  x = np.concatenate(
    [
      np.random.default_rng(1).random(10_000, dtype=np.float32),
      np.float32([0.0, 0.25, 0.5, 1.0, 1e-8, np.nextafter(0.25, 0)]),
    ]
  )
  y = np.asarray(to_model_range(jnp.asarray(x)))
  np.testing.assert_array_equal(y, x * np.float32(2) - np.float32(1))
  np.testing.assert_array_equal(
    np.asarray(from_model_range(jnp.asarray(y))), np.clip((y + np.float32(1)) / np.float32(2), 0, 1)
  )
  assert float(from_model_range(jnp.float32(3.0))) == 1.0

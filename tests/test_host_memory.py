"""Host-memory reuse: a step's temporary buffer stops being faulted in afresh on every call.

Each case runs in a fresh interpreter: the settings are process-wide and must precede JAX's start.
With reuse the heap settles over the first calls (see `latentfm.train.host_memory`), so the test
judges the median of the last 8 of 16 calls.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
  platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
  reason="the settings are glibc's",
)

_STEP = """
import json, resource, statistics
import jax, jax.numpy as jnp
from latentfm.train import host_memory
applied = host_memory.reuse_host_memory() if {reuse} else False
# The 64 MiB products are temporary buffers of the execution, not outputs.
step = jax.jit(lambda x, w: jnp.sum((x @ w)[::-1] @ w.T))
x, w = jnp.ones((4096, 256)) / 256, jnp.ones((256, 4096))
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(step(x, w))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"applied": applied, "faults": statistics.median_high(faults[8:]),
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}}))
"""


def _run(code: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_reuse_host_memory_stops_per_call_page_faults():
  default, reused = _run(_STEP.format(reuse=False)), _run(_STEP.format(reuse=True))
  assert not default["applied"] and default["async"]
  assert reused["applied"] and not reused["async"]
  # 64 MiB of fresh 4 KiB pages is 16,384 faults; glibc's defaults fault in at least that.
  assert default["faults"] > 16_000, (default, reused)
  assert reused["faults"] < default["faults"] / 4, (default, reused)


def test_reuse_host_memory_refuses_once_jax_has_started_and_is_idempotent():
  late = _run("""
      import json, jax, jax.numpy as jnp
      from latentfm.train import host_memory
      jnp.ones(3).block_until_ready()
      print(json.dumps({"applied": host_memory.reuse_host_memory(),
                        "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
      """)
  assert late == {"applied": False, "async": True}
  twice = _run("""
      import json
      from latentfm.train import host_memory
      first = host_memory.reuse_host_memory()
      import jax.numpy as jnp
      jnp.ones(3).block_until_ready()
      print(json.dumps({"first": first, "second": host_memory.reuse_host_memory()}))
      """)
  assert twice == {"first": True, "second": True}


def test_keep_freed_memory_applies_on_glibc():
  out = _run("""
      import json
      from latentfm.train import host_memory
      print(json.dumps({"kept": host_memory.keep_freed_memory()}))
      """)
  assert out == {"kept": True}

"""Host-memory reuse for training on the CPU.

XLA:CPU allocates one temporary buffer per execution of a step (gigabytes for the thesis
autoencoder at 64³). It is allocated on a worker thread, whose glibc heap cannot hold it, so
glibc maps fresh pages for it and unmaps them when the step ends: every step faults in and zeroes
the whole buffer again, and every intermediate of the step runs at the speed of fresh memory
(bench/RESULTS.md, "CPU kernel choices", row "host-memory reuse").

`reuse_host_memory` lets the buffer be allocated once and reused:

- XLA runs CPU executions on the calling thread (`jax_cpu_enable_async_dispatch=False`), whose
  heap is glibc's main heap;
- glibc serves large blocks from that heap instead of separate mappings (`mallopt(M_MMAP_MAX,
  0)`) and keeps freed heap memory instead of returning it (`mallopt(M_TRIM_THRESHOLD, -1)`).

The heap settles within the first steps: until then a step may still find no freed block it can
reuse and grow the heap by a fresh buffer. The costs: the process holds on to its peak host
memory until it exits, and Python waits for each CPU execution instead of running ahead of it.
Accelerator executions are not affected.
"""

import ctypes
import ctypes.util
import logging
import platform

import jax

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def _glibc() -> ctypes.CDLL | None:
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
  """The glibc half alone: large blocks from the heap, freed memory kept. False off glibc."""
  libc = _glibc()
  if libc is None:
    logging.info("host memory reuse not applied: needs Linux with glibc")
    return False
  if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, -1) != 1:
    logging.warning("host memory reuse not applied: glibc rejected mallopt")
    return False
  return True


def reuse_host_memory() -> bool:
  """Applies both settings above; True once they are in effect, False where they cannot be.

  Call it before JAX first runs anything: the dispatch setting is read when the CPU backend
  starts. Off Linux/glibc, or once a backend has started, it changes nothing and returns False.
  """
  global _applied
  if _applied:
    return True
  if _backends_started():
    logging.info("host memory reuse not applied: JAX backends have already started")
    return False
  if not keep_freed_memory():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _applied = True
  return True

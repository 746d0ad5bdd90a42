"""Data parallelism: a 1-D device mesh, shardings and host-to-device transfer.

Both training stages use `latentfm.train.compiler.jit` over a `Mesh` with one axis, `"data"`.
The batch is split along its leading axis over that axis and the train state
is replicated. The same code runs on one CPU, one GPU, several local devices
and several hosts (after `maybe_initialize_distributed`).

Multi-host: every process feeds only its own share of the global batch (see
`process_batch_size`) and `shard_batch` assembles the global array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"

# Set this to "1"/"true"/"auto" to let `jax.distributed.initialize()` detect
# the cluster (SLURM, Open MPI, TPU pods, ...) without the JAX_* variables.
AUTO_DETECT_ENV = "LATENTFM_DISTRIBUTED"
_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` if a multi-process run is configured.

  A run is multi-process when `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`
  (> 1) or `JAX_PROCESS_ID` is set, or when `LATENTFM_DISTRIBUTED` asks for
  cluster auto-detection. Unset values are left to JAX's auto-detection.
  Otherwise (a single machine) this does nothing. Call it before any other JAX
  call that touches devices.

  Args:
    environ: environment to read; defaults to `os.environ`.

  Returns:
    True if this call initialised the distributed runtime.
  """
  env = os.environ if environ is None else environ
  address = env.get(_ENV_ADDRESS) or None
  num_processes = _int_env(env, _ENV_NUM_PROCESSES)
  process_id = _int_env(env, _ENV_PROCESS_ID)
  auto = env.get(AUTO_DETECT_ENV, "").strip().lower() in ("1", "true", "auto")
  configured = address is not None or process_id is not None or (num_processes or 0) > 1
  if not (configured or auto) or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(
    coordinator_address=address, num_processes=num_processes, process_id=process_id
  )
  return True


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value is None or not value.strip():
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `"data"` over `devices` (default: all, global)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over `"data"`."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def process_batch_size(global_batch: int) -> int:
  """This process's share of `global_batch`.

  Raises:
    ValueError: if `global_batch` does not divide over the processes or over
      the devices.
  """
  n_proc, n_dev = jax.process_count(), jax.device_count()
  if global_batch <= 0:
    raise ValueError(f"Global batch size must be positive, got {global_batch}.")
  if global_batch % n_proc:
    raise ValueError(
      f"Global batch size {global_batch} is not divisible by the number of processes ({n_proc})."
    )
  if global_batch % n_dev:
    raise ValueError(
      f"Global batch size {global_batch} is not divisible by the number of devices ({n_dev})."
    )
  return global_batch // n_proc


def _local_device_count(mesh: Mesh) -> int:
  return len(mesh.local_devices)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Turns host-local arrays into global arrays sharded over `"data"`.

  Args:
    batch: pytree of arrays holding this process's share of the global batch
      (leading dimension = per-process batch size).
    mesh: mesh from `make_mesh`.

  Returns:
    The same pytree of `jax.Array`s whose leading dimension is the global
    batch (per-process batch x number of processes).

  Raises:
    ValueError: if a leaf has no leading axis or its size does not divide over
      this process's devices.
  """
  sharding = batch_sharding(mesh)
  n_local = _local_device_count(mesh)

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(
        f"Batch leaf {jax.tree_util.keystr(path)} is a scalar; batch leaves "
        "need a leading batch axis."
      )
    if x.shape[0] % n_local:
      raise ValueError(
        f"Local batch size {x.shape[0]} (leaf {jax.tree_util.keystr(path)}) "
        f"is not divisible by the number of local devices ({n_local})."
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (e.g. a train state) on every device of `mesh`.

  Leaves must hold the same value on every process. In multi-process runs
  arrays committed to one local device are copied through host memory first.
  """
  sharding = replicated(mesh)
  multi = jax.process_count() > 1

  def put(x):
    if multi and isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)

"""Multi-host start-up: `jax.distributed.initialize` from the mesh config or the environment.

Every process runs the same program; after `initialize` `jax.devices()` lists the devices
of all processes, so `make_mesh` builds one global mesh and jit runs one SPMD program over
it. On CPU the cross-process collectives go through gloo (jax's default
`jax_cpu_collectives_implementation`). Call `initialize` before anything touches a device.
"""
from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(environ, name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment {name}={value!r} must be an integer") from None


def process_settings(mesh_cfg, environ=None) -> tuple[str | None, int, int | None]:
    """(coordinator "host:port", number of processes, this process's id): the config's
    values (mesh.coordinator / mesh.num_processes / mesh.process_id) where set, else the
    environment's (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).

    Raises:
      ValueError: a non-integer environment value.
    """
    environ = os.environ if environ is None else environ
    coordinator = mesh_cfg.coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = mesh_cfg.num_processes
    if num_processes == 1:
        num_processes = _env_int(environ, ENV_NUM_PROCESSES) or 1
    process_id = mesh_cfg.process_id
    if process_id is None:
        process_id = _env_int(environ, ENV_PROCESS_ID)
    return coordinator, num_processes, process_id


def initialize(mesh_cfg, environ=None) -> bool:
    """Join this process to a multi-process run; a no-op for a single process.

    Args:
      mesh_cfg: a `MeshConfig` (coordinator, num_processes, process_id).
      environ: the environment to read (default `os.environ`).
    Returns:
      True when this call initialized jax.distributed (or it already was), False for one
      process.
    Raises:
      ValueError: several processes but no coordinator or process id, or a process id
        outside [0, num_processes); the message names the config key and the variable.
    """
    coordinator, num_processes, process_id = process_settings(mesh_cfg, environ)
    if num_processes == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if coordinator is None:
        raise ValueError(f"mesh.num_processes={num_processes} needs a coordinator: set "
                         f"mesh.coordinator=host:port (process 0's address) or {ENV_COORDINATOR}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(f"mesh.process_id={process_id} (or {ENV_PROCESS_ID}) must be an integer "
                         f"in [0, {num_processes}) for mesh.num_processes={num_processes}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True

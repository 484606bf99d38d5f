"""Starting `jax.distributed` so that pipeline stages can live in several processes or on several hosts.

Where the settings come from, first match wins:
  1. explicit arguments / command-line flags (`add_arguments`: --coordinator_address, --num_processes, --process_id);
  2. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (and JAX_LOCAL_DEVICE_IDS);
  3. a launcher JAX knows how to read (SLURM's srun: SLURM_NTASKS / SLURM_PROCID; Open MPI's mpirun:
     OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK): the counts are taken from there and whatever is still missing
     (the coordinator address) is left to `jax.distributed.initialize`'s own cluster detection.
Nothing set means one process: `initialize` then does nothing.

On CPU, cross-process collectives need an implementation (gloo by default), which must be chosen before the backend
starts: call `initialize` before any other JAX work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

import jax

_LAUNCHERS = (
    # (name, process count variable, process id variable)
    ("slurm", "SLURM_NTASKS", "SLURM_PROCID"),
    ("ompi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    source: str = "single"      # "args", "env", "slurm", "ompi" or "single"

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids=None,
            environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """The distributed settings from arguments, then JAX_* variables, then a SLURM / Open MPI launcher."""
    env = os.environ if environ is None else environ
    source = "args" if any(v is not None for v in (coordinator_address, num_processes, process_id)) else None
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    n = num_processes if num_processes is not None else _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    if source is None and (addr or n is not None or pid is not None):
        source = "env"
    if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [_int(v, "JAX_LOCAL_DEVICE_IDS") for v in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    if n is None and pid is None:
        for name, count_var, id_var in _LAUNCHERS:
            if env.get(count_var) is not None and env.get(id_var) is not None:
                n, pid = _int(env[count_var], count_var), _int(env[id_var], id_var)
                source = source if source == "args" else name
                break
    ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
    if n is None or n <= 1:
        if pid not in (None, 0):
            raise ValueError(f"process id {pid} given for a single process (set the process count too)")
        return DistributedConfig(addr, 1, 0, ids, "single" if n is None and source is None else source)
    if pid is None:
        raise ValueError(f"{n} processes but no process id (--process_id or JAX_PROCESS_ID)")
    if not 0 <= pid < n:
        raise ValueError(f"process id {pid} is outside 0..{n - 1}")
    if addr is None and source in ("args", "env"):
        raise ValueError(f"{n} processes but no coordinator address (--coordinator_address host:port or "
                         f"JAX_COORDINATOR_ADDRESS)")
    return DistributedConfig(addr, n, pid, ids, source)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, *, cpu_collectives: str = "gloo",
               initialization_timeout: int = 300) -> DistributedConfig:
    """Resolves the settings (see `resolve`) and starts `jax.distributed` when there is more than one process."""
    cfg = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if not cfg.multi_process:
        return cfg
    # Only consulted by the CPU client; harmless where the processes drive accelerators.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id,
                               local_device_ids=None if cfg.local_device_ids is None else list(cfg.local_device_ids),
                               initialization_timeout=initialization_timeout)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator_address", default=None,
                       help="host:port of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num_processes", type=int, default=None, help="default: $JAX_NUM_PROCESSES or the launcher")
    group.add_argument("--process_id", type=int, default=None, help="default: $JAX_PROCESS_ID or the launcher")


def initialize_from_args(args: argparse.Namespace, **kwargs) -> DistributedConfig:
    return initialize(args.coordinator_address, args.num_processes, args.process_id, **kwargs)

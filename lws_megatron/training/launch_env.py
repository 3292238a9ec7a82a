"""Who am I in the job: ranks from torchrun, from MPI (mpirun, srun --mpi=pmix), or a lone process.

torchrun exports RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Under MPI those are absent, so the
ranks come from mpi4py and rank 0 broadcasts its address and a free port for the rendezvous.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def discover(environ: dict[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if any(marker in env for marker in _MPI_MARKERS):
        return _from_mpi()
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def _from_mpi() -> LaunchEnv:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if comm.Get_rank() == 0:
        host = socket.gethostname()
        address = (socket.gethostbyname(host) if comm.Get_size() > local.Get_size() else "127.0.0.1")
        rendezvous = (address, free_port())
    else:
        rendezvous = None
    address, port = comm.bcast(rendezvous, root=0)
    return LaunchEnv(comm.Get_rank(), comm.Get_size(), local.Get_rank(), address, port, "mpi")


def export(env: LaunchEnv) -> None:
    """Set the variables torch.distributed and DeepSpeed read, for launchers that don't."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )

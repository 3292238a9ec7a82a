"""The job's processes: who is who (torchrun, MPI or a lone process), the default process group,
the parallel plan everyone reads, and Megatron's model-parallel groups, each set up once.

torchrun exports RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Under MPI those are absent, so the
ranks come from mpi4py and rank 0 broadcasts its address and a free port for the rendezvous.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from lws_megatron.config import Config
from lws_megatron.errors import UserError
from lws_megatron.model import cuda_bridge
from lws_megatron.model.parallel import check_layout, virtual_pipeline_size
from lws_megatron.planner import plan_layout

T = TypeVar("T")
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
    from mpi4py import MPI  # optional: only MPI launches need it

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if comm.Get_rank() == 0:
        host = socket.gethostname()
        address = socket.gethostbyname(host) if comm.Get_size() > local.Get_size() else "127.0.0.1"
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


def skip_cpu_comm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce (`deepspeed_shm_comm`)
    when its communication backend starts. The build runs under a file lock in
    $TORCH_EXTENSIONS_DIR, by default shared by every environment on the machine, which a
    process killed mid-build leaves behind: every later start then waits on it without a word.
    Only `deepspeed.comm.inference_all_reduce` (DeepSpeed inference, AutoTP) uses the op, and
    falls back to the process group without it; training never calls it."""
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_processes() -> torch.device:
    """Join the job's default process group (nccl on CUDA, gloo on CPU); this rank's device."""
    env = discover()
    export(env)
    skip_cpu_comm_op()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            verbose=False,
        )
    return device


def agreed(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raises a UserError anywhere, raise it everywhere, so one
    rank's bad input never leaves the others waiting in a collective."""
    try:
        result, error = fn(), None
    except UserError as err:
        result, error = None, str(err)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)
    return result


@dataclass(frozen=True)
class ParallelPlan:
    """How a job of `world` processes splits a config: read by everyone, changed by no one."""

    world: int
    tp: int
    pp: int
    dp: int
    layout: str | None  # Megatron's pipeline_model_parallel_layout; None: the even split
    vpp: int | None  # model chunks per pipeline rank (None: no virtual pipeline)
    micro_batch_size: int
    global_batch_size: int

    @property
    def micro_batches(self) -> int:
        """Micro batches each data-parallel rank runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)


def resolve_plan(config: Config, world: int, launched: str | None = None) -> ParallelPlan:
    """Check TP, PP, the layout and the batch against `world` processes; plan `auto` layouts.

    `launched` says how the processes were asked for, for the messages."""
    tp, pp, t = config.parallel.tp, config.parallel.pp, config.train
    launched = launched or f"{world} processes"
    if world % (tp * pp):
        raise UserError(
            f"{launched} can't hold parallel.tp={tp} x parallel.pp={pp}: launch a multiple of "
            f"{tp * pp} processes, or change parallel.tp/parallel.pp"
        )
    dp = world // (tp * pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp} ({launched} "
            f"/ TP {tp} / PP {pp}); use a multiple of {t.micro_batch_size * dp}"
        )
    config.summary(tp)  # raises UserError naming the first layer whose heads TP can't divide
    layout = config.parallel.pipeline_layout.strip()
    if layout == "auto":
        layout = plan_layout(config)
    layout = check_layout(config.model.num_layers, pp, layout)
    return ParallelPlan(
        world,
        tp,
        pp,
        dp,
        layout,
        virtual_pipeline_size(layout, pp),
        t.micro_batch_size,
        t.global_batch_size,
    )


def initialize_model_parallel(plan: ParallelPlan, seed: int) -> None:
    """Megatron's TP/PP/DP groups for `plan` over the default process group.

    Also installs the CPU bridges (inert on CUDA) and, on CUDA, seeds Megatron's CUDA RNG
    tracker that TE attention and dropout draw from.
    """
    if dist.get_world_size() != plan.world:
        raise UserError(
            f"the plan is for {plan.world} processes but {dist.get_world_size()} joined the job"
        )
    cuda_bridge.install()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=plan.tp,
        pipeline_model_parallel_size=plan.pp,
        virtual_pipeline_model_parallel_size=plan.vpp,
    )
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel groups (the default process group stays)."""
    parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def model_parallel(config: Config) -> Iterator[ParallelPlan]:
    """Megatron's groups for `config` over the already joined default group, for one block."""
    plan = agreed(lambda: resolve_plan(config, dist.get_world_size()))
    initialize_model_parallel(plan, config.train.seed)
    try:
        yield plan
    finally:
        destroy_model_parallel()

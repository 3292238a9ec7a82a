"""A rank that stops answering ends the job in one line naming it, not in a hang.

Every process group waits `run.collective_timeout_s` for a collective once the first step is
done (setup, the first step's compiles and checkpoint saves wait up to `SETUP_TIMEOUT_S`, as
torchtitan separates its init and train timeouts). A collective that times out on gloo raises
in the ranks still alive; each of them then answers a roll call in the job's key-value store
and the ranks that did not answer are named, with the collective that was waiting for them, by
the lowest rank that did (a store that stopped answering is rank 0's, which holds it). Torch's
`monitored_barrier` names missing ranks too, but only from rank 0, so it cannot name rank 0.

On NCCL the collectives run on the device and torch's watchdog ends the process at the
timeout; the NCCL flight recorder is on and dumped into `run.dir/flight_recorder/` (one file
per rank: what each rank had issued and completed), which
`python -m torch.distributed.flight_recorder.fr_trace` reads to name the rank that did not
join.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from lws_megatron.errors import JobFailure

SETUP_TIMEOUT_S = 1800.0  # torch's gloo default; the setup reads and indexes the corpus
ROLL_CALL_S = 10.0  # how long the ranks still alive wait for each other after a timeout
_PEER_LOST = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")


def setup_timeout(collective_timeout_s: float) -> timedelta:
    return timedelta(seconds=max(collective_timeout_s, SETUP_TIMEOUT_S))


def flight_recorder(run_dir: Path) -> None:
    """On CUDA, before the process group exists: NCCL's flight recorder on, dumped on a timeout
    into run.dir (settings the user exported win)."""
    folder = run_dir / "flight_recorder"
    folder.mkdir(parents=True, exist_ok=True)
    # PyTorch's current names (TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE
    # are deprecated, and warn on every process group); a user's setting under either wins.
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in os.environ:
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(folder / "rank_"))


def set_timeout(seconds: float) -> None:
    """Every process group of this rank (the default one, Megatron-Core's, DeepSpeed's, the
    host's) waits `seconds` for a collective from now on."""
    timeout = timedelta(seconds=seconds)
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timeout, group)


@contextlib.contextmanager
def patient(collective_timeout_s: float) -> Iterator[None]:
    """A phase in which one rank may legitimately keep the others waiting (a checkpoint save:
    the slowest writer, rank 0 pruning old checkpoints)."""
    set_timeout(setup_timeout(collective_timeout_s).total_seconds())
    try:
        yield
    finally:
        set_timeout(collective_timeout_s)


def is_peer_lost(err: BaseException) -> bool:
    """A collective that gave up on another rank: gloo's timeout, or a peer's socket closed."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_LOST)


def roll_call(wait_s: float = ROLL_CALL_S) -> list[int]:
    """Collective of the ranks still alive: the ranks that did not answer within `wait_s`."""
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=wait_s))
    key = f"lws/roll_call/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    world = dist.get_world_size()
    try:
        store.set(key + str(dist.get_rank()), "here")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([key + str(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)
    except RuntimeError:  # the store stopped answering: rank 0, which holds it, is gone
        return [0]


def peer_failure(err: BaseException, where: str, collective_timeout_s: float) -> JobFailure:
    """The one line for a collective that gave up on another rank, after the roll call."""
    missing = roll_call()
    alive = [r for r in range(dist.get_world_size()) if r not in missing]
    waiting = _collective(err)
    if missing:
        names = ", ".join(map(str, missing))
        line = (
            f"rank{'s' if len(missing) > 1 else ''} {names} did not arrive at {waiting} "
            f"({where}) within run.collective_timeout_s={collective_timeout_s:g}: stopped, hung, "
            "dead or its host unreachable; the job ends here (started again, it resumes from "
            "its last checkpoint)"
        )
    else:
        line = (
            f"{waiting} ({where}) gave up after run.collective_timeout_s="
            f"{collective_timeout_s:g} s while every rank still answers: some rank was slower "
            "than that or in another collective; raise run.collective_timeout_s if steps are that "
            f"slow ({str(err).strip().splitlines()[0][:160]})"
        )
    return JobFailure(line, report=bool(alive) and dist.get_rank() == min(alive))


def _collective(err: BaseException) -> str:
    """The torch.distributed call that gave up, and the line of ours that made it."""
    frames = traceback.extract_tb(err.__traceback__)
    c10d = [f for f in frames if f.filename.endswith("distributed_c10d.py")]
    core = [f for f in frames if f"{os.sep}megatron{os.sep}core{os.sep}" in f.filename]
    ours = [f for f in frames if f"{os.sep}lws_megatron{os.sep}" in f.filename]
    if c10d:
        name = c10d[-1].name
    elif core:  # waiting on work Megatron-Core started (DDP's bucket all-reduce, PP's sends)
        name = f"megatron.core {Path(core[-1].filename).stem}.{core[-1].name}"
    else:
        name = "a collective"
    if not ours:
        return name
    caller = ours[-1]
    module = Path(caller.filename).name
    return f"{name} (from {module}:{caller.lineno} {caller.name})"

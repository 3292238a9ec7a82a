"""torchrun, with stops that keep the run: the same command line as `torchrun`.

    python launch/torchrun.py --nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:PORT --rdzv-id JOB launch/pretrain.py --config CONFIG [key=value ...]

torchrun starts each worker in a session of its own, so `kill -- -PGID`, `timeout` or Ctrl-C
reach its agent only; the agent answers SIGTERM or SIGINT by passing it on, SIGKILLing the
workers 30 s later whether or not their checkpoint is written, and exiting 1 with a traceback.
Here SIGTERM, SIGINT and SIGUSR1 are passed to the workers (which checkpoint at the end of the
step and exit 0), the agent keeps watching them, and the exit status is theirs. A failed job
ends without torchrun's report: the ranks' own line says why, or for ranks killed by a signal
(which say nothing) one line naming them; exit status 2 when every failed rank refused its
input, else 1. Restarts, rendezvous and logs are torchrun's own,
but the workers of each restart get a key-value store of their own: in the store torchrun
shares across restarts (torch 2.4+), the addresses of the last attempt's gloo and NCCL groups
are still there, and the restarted group connects to them and fails (pytorch/pytorch#135712).
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

PASSED_ON = ("SIGTERM", "SIGINT", "SIGUSR1")
# How long the agent lets the workers it stops on a signal end on their own before SIGKILL:
# the survivors' roll call (lws_megatron.training.hangs) and exit, not torchrun's 30 s. After a
# worker fails, torch 2.13-2.14 stops the others with a fixed 30 s (the process context's
# `_poll` calls `close()` with its default), so a stopped rank is killed 30 s after the failure.
SHUTDOWN_TIMEOUT_S = 15


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers, for the agent)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def pass_on(signum: int, frame) -> None:
    for pid in children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def failure_line(err: ChildFailedError) -> tuple[str | None, int]:
    """One line for the ranks that failed (None when each exited 1 or 2: it said why itself),
    and the exit status."""
    parts, codes = [], set()
    for rank, failure in sorted(err.failures.items()):
        code = failure.exitcode
        codes.add(code)
        how = f"killed by {failure.signal_name()}" if code < 0 else f"exit status {code}"
        parts.append(f"rank {rank} (pid {failure.pid}) {how}")
    line = None if codes <= {1, 2} else f"torchrun: the job failed: {'; '.join(parts)}"
    return line, 2 if codes == {2} else 1


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = parse_args(argv)
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    args.signals_to_handle = ",".join(
        s for s in args.signals_to_handle.split(",") if s.strip() not in PASSED_ON
    )
    for name in PASSED_ON:
        signal.signal(getattr(signal, name), pass_on)
    try:
        run(args)
    except ChildFailedError as err:
        line, status = failure_line(err)
        if line:
            print(line, file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())

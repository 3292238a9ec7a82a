"""launch/torchrun.py's end of a failed job: no torchrun report, one line only where the ranks
could not say why themselves (killed by a signal), and the exit status a scheduler acts on."""

import signal

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from launch.torchrun import failure_line


def _failed(*codes: int) -> ChildFailedError:
    failures = {
        rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
        for rank, code in enumerate(codes)
    }
    return ChildFailedError("pretrain.py", failures)


def test_ranks_that_said_why_get_no_second_line():
    assert failure_line(_failed(1, 1)) == (None, 1)
    assert failure_line(_failed(2, 2)) == (None, 2)  # every rank refused its input: status 2
    assert failure_line(_failed(2, 1)) == (None, 1)


def test_a_rank_killed_by_a_signal_is_named():
    line, status = failure_line(_failed(1, -signal.SIGKILL))
    assert status == 1
    assert line == (
        "torchrun: the job failed: rank 0 (pid 100) exit status 1; rank 1 (pid 101) killed by "
        "SIGKILL"
    )

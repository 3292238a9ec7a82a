"""A collective that gives up on a rank names it: real gloo timeouts on 3 processes."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from lws_megatron.training import hangs
from tests.helpers.dist_utils import run_distributed

pytestmark = pytest.mark.distributed
TIMEOUT_S = 2.0


def _one_rank_absent(absent: int) -> tuple[bool, str, bool]:
    """(a peer was lost, the line, whether this rank prints it) on the ranks still there."""
    hangs.ROLL_CALL_S = 3.0
    hangs.set_timeout(TIMEOUT_S)
    if dist.get_rank() == absent:
        time.sleep(TIMEOUT_S + 2 * hangs.ROLL_CALL_S)  # past the others' timeout and roll call
        return False, "", False
    try:
        dist.all_reduce(torch.ones(2))
    except RuntimeError as err:
        failure = hangs.peer_failure(err, "after step 7", TIMEOUT_S)
        return hangs.is_peer_lost(err), str(failure), failure.report
    return False, "the collective did not time out", False


@pytest.mark.slow
def test_a_collective_that_gives_up_names_the_rank_that_did_not_arrive():
    results = run_distributed(_one_rank_absent, 3, 1, timeout=120)
    expected = (
        "rank 1 did not arrive at all_reduce (after step 7) within run.collective_timeout_s=2: "
        "stopped, hung, dead or its host unreachable; the job ends here (started again, it "
        "resumes from its last checkpoint)"
    )
    assert results[0] == (True, expected, True)  # the lowest rank still there prints it
    assert results[2] == (True, expected, False)


@pytest.mark.slow
def test_an_absent_rank_0_is_named_by_rank_1():
    results = run_distributed(_one_rank_absent, 3, 0, timeout=120)
    assert results[1][0] and results[1][1].startswith("rank 0 did not arrive at all_reduce")
    assert results[1][2] and not results[2][2]


def _roll_call() -> list[int]:
    return hangs.roll_call(wait_s=5.0)


def test_a_roll_call_everyone_answers_names_no_one():
    assert run_distributed(_roll_call, 2) == [[], []]


def test_the_nccl_flight_recorder_dumps_into_the_run_directory(tmp_path, monkeypatch):
    names = (
        "TORCH_FR_BUFFER_SIZE",
        "TORCH_NCCL_TRACE_BUFFER_SIZE",
        "TORCH_NCCL_DUMP_ON_TIMEOUT",
        "TORCH_FR_DUMP_TEMP_FILE",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
    )
    for name in names:  # set, then removed: monkeypatch restores each one after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", "/scratch/fr_")  # the user's wins
    hangs.flight_recorder(tmp_path / "run")
    assert (tmp_path / "run" / "flight_recorder").is_dir()
    assert int(os.environ["TORCH_FR_BUFFER_SIZE"]) > 0
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ  # deprecated: warns at every group
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == "/scratch/fr_"
    monkeypatch.delenv("TORCH_FR_DUMP_TEMP_FILE")
    hangs.flight_recorder(tmp_path / "run")
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(
        tmp_path / "run" / "flight_recorder" / "rank_"
    )

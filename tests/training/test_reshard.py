"""Checkpoints resume at another layout (real torchrun jobs on gloo): trained at TP=2 x PP=2
(planned layout, ZeRO 1) for 4 steps, resumed at TP=1 x DP=2, at PP=2 x DP=2 with another
layout, at ZeRO 0 and at ZeRO 2 under a virtual pipeline and another micro batch, each continues
the uninterrupted run's losses; a changed global batch is refused with the fix; and a run
killed again and again while it saves in the background resumes bit for bit."""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from test_training import ROOT, command, records, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SAVED = ("parallel.tp=2", "parallel.pp=2", "parallel.pipeline_layout=auto", "zero.stage=1")
BLOCKS = {
    "default": (),
    "paper": ("model.qk_norm=full", "model.norm_placement=post", "model.init=olmo"),
}
TARGETS = {  # name: (processes, overrides)
    "tp1_dp2": (2, ("parallel.tp=1", "parallel.pp=1", "parallel.pipeline_layout=''")),
    "pp2_dp2_layout": (4, ("parallel.tp=1", "parallel.pp=2", "parallel.pipeline_layout=Et|t*3L")),
    "zero0_tp2_dp2": (4, ("parallel.pp=1", "parallel.pipeline_layout=''", "zero.stage=0")),
    "zero2_vpp_micro1": (
        4,
        (
            "parallel.tp=1",
            "parallel.pp=2",
            "parallel.pipeline_layout=Et|t|t|tL",
            "zero.stage=2",
            "train.micro_batch_size=1",
        ),
    ),
}
RUN = ("train.max_steps=8", "checkpoint.interval=4", "checkpoint.keep=2", "eval.interval=0")


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def saved(request, tmp_path_factory, tiny_data):
    """(block, the uninterrupted TP=2 x PP=2 run of 8 steps, which saved step 4 on the way)."""
    root = tmp_path_factory.mktemp(f"reshard-{request.param}")
    run_dir, _ = train(root, "whole", 4, tiny_data, *RUN, *SAVED, *BLOCKS[request.param])
    return request.param, run_dir


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_checkpoint_resumes_at_another_layout_with_the_same_losses(
    tmp_path, tiny_data, saved, target
):
    block, whole = saved
    moved = tmp_path / "moved"
    shutil.copytree(whole, moved)
    shutil.rmtree(moved / "checkpoints" / "step_00000008")  # as if stopped after step 4
    nproc, layout = TARGETS[target]
    _, proc = train(tmp_path, "moved", nproc, tiny_data, *RUN, *SAVED, *BLOCKS[block], *layout)
    assert "resumed from" in proc.stdout and "at step 4 (saved at TP=2 x PP=2" in proc.stdout
    want, got = records(whole), records(moved)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose(
        [got[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=0, atol=1e-4
    )


def test_a_changed_global_batch_is_refused_with_the_fix(tmp_path, tiny_data):
    train(tmp_path, "gb", 1, tiny_data, "train.max_steps=2")
    _, proc = train(
        tmp_path, "gb", 1, tiny_data, "train.max_steps=4", "train.global_batch_size=16", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "was saved with train.global_batch_size=8 and this run has 16: the data position is "
        "counted in global batches; resume with train.global_batch_size=8 (TP, PP, DP, ZeRO "
        "and the micro batch size may change)"
    ) in proc.stderr


ASYNC = ("train.max_steps=16", "checkpoint.interval=1", "checkpoint.async_save=true")


def test_killed_during_background_saves_ten_times_it_resumes_bit_for_bit(tmp_path, tiny_data):
    """SIGKILL at random moments of a run that saves every step in the background, ten times
    over, each start resuming from the newest complete checkpoint; the run then ends with the
    losses of one that was never killed, exactly."""
    whole, _ = train(tmp_path, "whole", 1, tiny_data, *ASYNC, "eval.interval=0")
    run_dir, rng, kills = tmp_path / "killed", random.Random(24), 0
    for _ in range(10):
        proc = subprocess.Popen(
            command(1, run_dir, tiny_data, *ASYNC, "eval.interval=0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        for line in proc.stdout:  # into the steps, then a random moment of the saves
            if line.startswith("step "):
                time.sleep(rng.uniform(0.0, 0.5))
                break
        proc.kill()
        out = proc.communicate(timeout=60)[0]
        kills += proc.returncode == -signal.SIGKILL
        assert "Traceback" not in out and "damaged" not in out, out
        resumed = re.findall(r"resumed from (\S+) at step", out)
        assert all(re.search(r"/step_\d{8}$", path) for path in resumed), resumed
    # nothing half-written ever passed for a checkpoint, nor was found damaged
    assert not list((run_dir / "checkpoints").glob("*.damaged"))
    assert kills >= 5  # most tries were killed mid-run, not after the run had ended
    _, proc = train(tmp_path, "killed", 1, tiny_data, *ASYNC, "eval.interval=0")
    assert records(run_dir) == records(whole)  # exact, bit for bit

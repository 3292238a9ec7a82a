"""The OLMo-2 block through the real trainer: TP with ZeRO-1 (compiled) and ZeRO-2, resume."""

import signal
import subprocess

import numpy as np
import pytest
from test_training import ROOT, command, losses, records, train

pytestmark = pytest.mark.slow  # every test here trains

OLMO = (
    "model.norm_placement=post",
    "model.qk_norm=full",
    "model.init=olmo",
    "optim.no_decay=[embeddings]",
)


@pytest.fixture(scope="module")
def olmo_reference(tmp_path_factory, tiny_data):
    run_dir, _ = train(tmp_path_factory.mktemp("olmo"), "ref", 1, tiny_data, *OLMO)
    return run_dir


def test_olmo_block_trains(olmo_reference):
    loss = losses(olmo_reference)
    assert len(loss) == 10 and np.isfinite(loss).all() and loss[-1] < loss[0] - 0.3


@pytest.mark.parametrize("zero, compile", [(1, "model"), (2, "none")])
def test_tp2_with_zero_matches_tp1(tmp_path, tiny_data, olmo_reference, zero, compile):
    # ZeRO-2 reduces gradients inside backward: allowed with TP because the full-width gain
    # needs no sum over TP ranks.
    run_dir, _ = train(
        tmp_path,
        "tp2",
        2,
        tiny_data,
        *OLMO,
        "parallel.tp=2",
        f"zero.stage={zero}",
        f"train.compile={compile}",
    )
    np.testing.assert_allclose(losses(run_dir), losses(olmo_reference), rtol=0, atol=1e-4)


def test_killed_olmo_run_resumes_to_the_same_losses(tmp_path, tiny_data, olmo_reference):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        command(1, run_dir, tiny_data, *OLMO, "checkpoint.interval=4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout:
        if "step_00000004" in line and "saved checkpoint" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and max(records(run_dir)) < 10
    _, resumed = train(tmp_path, "killed", 1, tiny_data, *OLMO, "checkpoint.interval=4")
    assert "resumed from" in resumed.stdout
    assert losses(run_dir).tolist() == losses(olmo_reference).tolist()
    # The same weights under the pre-norm block would be another model: refused.
    _, refused = train(
        tmp_path,
        "killed",
        1,
        tiny_data,
        *OLMO,
        "model.norm_placement=pre",
        "train.max_steps=12",
        check=False,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "norm_placement" in refused.stderr

"""The training loop waits for the device once per log interval, not once per step.

On a CPU nothing waits, so `count_syncs` counts every read of a tensor's values in the
training process; the batches are built in loader workers (other processes), so each read
left is one that a GPU would wait for.
"""

import subprocess
import sys

import pytest
import torch

from lws_megatron.config import load_config
from lws_megatron.device import count_syncs
from tests.helpers.dist_utils import run_distributed
from tests.training.test_training import ROOT, TINY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _reads_between_steps(
    run_dir: str, data: dict[str, str], overrides: list[str], read_every_s: float | None = None
) -> list[int]:
    """Reads of device values between one step's end and the next one's."""
    from lws_megatron.training import trainer

    if read_every_s is not None:
        trainer.READ_EVERY_S = read_every_s

    config = load_config(
        TINY,
        [
            f"run.dir={run_dir}",
            f"data.path=[{data['prefix']}]",
            f"data.tokenizer={data['tokenizer']}",
            "train.max_steps=10",
            "train.log_interval=5",
            "eval.interval=0",
            "data.num_workers=2",
            *overrides,
        ],
    )
    marks = []
    read_due = trainer.Trainer.read_due
    with count_syncs(torch.device("cpu")) as counter:

        def marked(self):
            marks.append(counter.count)
            return read_due(self)

        trainer.Trainer.read_due = marked
        trainer.train(config)
    return [b - a for a, b in zip(marks, marks[1:])]


@pytest.mark.parametrize(
    "layout",
    [["train.global_batch_size=8"], ["parallel.pp=2"], ["zero.stage=1"]],
    ids=["dp2", "pp2", "dp2-zero1"],
)
def test_a_step_reads_nothing_and_an_interval_reads_once(tmp_path, tiny_data, layout):
    """DP=2 (gradients all-reduced, clipped and checked on the device), PP=2 (the loss on the
    last stage, the norm summed over stages) and DP=2 at ZeRO 1 (DeepSpeed updates each rank's
    shard and gathers the weights, its own norm and overflow check off): after the first two
    steps (read to learn the step time) the host reads once per log interval, after steps 5
    and 10 (steps far faster than READ_EVERY_S, set beyond any machine's hiccup)."""
    reads = run_distributed(_reads_between_steps, 2, str(tmp_path / "run"), tiny_data, layout, 1e9)
    for rank_reads in reads:
        assert rank_reads == [1, 1, 0, 0, 1, 0, 0, 0, 0]


def test_slow_steps_are_read_more_often_than_the_log_interval(tmp_path, tiny_data):
    """A pre-emption signal must not wait for a long log interval of slow steps: with steps
    slower than READ_EVERY_S every step is read, and every rank reads at the same steps."""
    reads = run_distributed(
        _reads_between_steps, 2, str(tmp_path / "run"), tiny_data, ["parallel.pp=2"], 1e-9
    )
    assert reads == [[1] * 9, [1] * 9]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="set_sync_debug_mode needs CUDA")
def test_a_steady_state_step_never_synchronises_on_cuda():
    """A lone process on NCCL, as `launch/gpu_check.py` runs it."""
    script = (
        "from lws_megatron.measure.syncs import first_sync\n"
        "from lws_megatron.config import load_config\n"
        "from lws_megatron.training.distributed import init_processes\n"
        "init_processes()\n"
        f"print('first sync:', first_sync(load_config({str(TINY)!r}, [])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "first sync: None" in proc.stdout

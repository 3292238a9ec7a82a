"""The DeepSpeed configuration each ZeRO stage gets: it holds the optimizer state, nothing else."""

import pytest

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.zero import deepspeed_config
from tests.helpers import TINY


def _config(stage: int, *overrides: str):
    return load_config(
        TINY,
        [
            f"zero.stage={stage}",
            "train.global_batch_size=16",
            "train.micro_batch_size=2",
            "optim.clip_grad=0.5",
            *overrides,
        ],
    )


def test_every_stage_hands_deepspeed_the_whole_batch_once():
    """DDP has reduced the global batch's gradients before DeepSpeed's step sees them."""
    for stage in (0, 1, 2):
        ds = deepspeed_config(_config(stage), dp=2)
        assert ds["train_batch_size"] == 16
        assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
        assert ds["zero_optimization"]["stage"] == stage


def test_deepspeed_neither_reduces_nor_clips_nor_reads_the_norm():
    """The train module clips and skips on the device; DeepSpeed's own norm, clipping and
    overflow check would each read the device back."""
    for stage in (1, 2):
        ds = deepspeed_config(_config(stage), dp=2, bf16_weights=True)
        zero = ds["zero_optimization"]
        assert zero["overlap_comm"] is False and zero["compute_grad_norm"] is False
        assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["check_grad_overflow"] is False
        assert ds["data_types"] == {"grad_accum_dtype": "bf16"}  # not its re-reducing BF16 one


def test_zero_3_is_refused_in_one_line():
    with pytest.raises(UserError, match="zero.stage=3 is not allowed"):
        _config(3)


def test_no_deepspeed_mixed_precision_and_no_per_step_printing():
    ds = deepspeed_config(_config(1), dp=1)
    assert ds["bf16"]["enabled"] is False  # fp32 weights
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] >= 2**30


def test_deepspeeds_throughput_timer_never_synchronises_the_device():
    """The engine reads its timer from this config; enabled, it waits for the device on every
    forward and step."""
    from deepspeed.utils.config import get_timers_config

    for stage in (0, 1, 2):
        timer = get_timers_config(deepspeed_config(_config(stage), dp=1))
        assert not timer.enabled and not timer.synchronized


def test_deepspeed_keeps_the_fp32_masters_of_bf16_weights_only_under_zero():
    """At ZeRO 0 our master-weight AdamW does (training/optimizer.py), without DeepSpeed's
    host-synchronising bf16 optimizer."""
    assert deepspeed_config(_config(1), dp=1, bf16_weights=True)["bf16"]["enabled"] is True
    assert deepspeed_config(_config(0), dp=1, bf16_weights=True)["bf16"]["enabled"] is False

"""The DeepSpeed configuration each ZeRO stage gets: who accumulates, who clips, what stays off."""

from pathlib import Path

from lws_megatron.config import load_config
from lws_megatron.training.zero import deepspeed_config, uses_deepspeed_backward

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


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


def test_stages_0_and_1_hand_deepspeed_the_whole_batch_once():
    for stage in (0, 1):
        ds = deepspeed_config(_config(stage), dp=2)
        assert ds["train_batch_size"] == 16
        assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
        assert ds["zero_optimization"]["stage"] == stage
        assert not uses_deepspeed_backward(_config(stage))


def test_stages_2_and_3_accumulate_each_micro_batch_in_deepspeed():
    for stage in (2, 3):
        ds = deepspeed_config(_config(stage), dp=2)
        assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
        assert ds["train_batch_size"] == 2 * 4 * 2
        assert uses_deepspeed_backward(_config(stage))


def test_only_zero_lets_deepspeed_clip():
    assert deepspeed_config(_config(0), dp=1)["gradient_clipping"] == 0.0  # the runtime clips
    assert deepspeed_config(_config(1), dp=1)["gradient_clipping"] == 0.5


def test_no_deepspeed_mixed_precision_and_no_per_step_printing():
    ds = deepspeed_config(_config(1), dp=1)
    assert ds["bf16"] == {"enabled": False}  # fp32 weights
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
    assert deepspeed_config(_config(1), dp=1, bf16_weights=True)["bf16"] == {"enabled": True}
    assert deepspeed_config(_config(0), dp=1, bf16_weights=True)["bf16"] == {"enabled": False}

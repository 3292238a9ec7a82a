"""The warning a run gets before it reads its training data more than once."""

import pytest

from lws_megatron.config import load_config
from lws_megatron.dataset.manifest import manifest_path, read_manifest
from lws_megatron.training.data_passes import data_passes, passes_warning
from tests.helpers import TINY


def _config(steps: int):
    return load_config(TINY, [f"train.max_steps={steps}"])


def test_passes_are_tokens_read_over_tokens_held(tiny_data):
    prefix = tiny_data["prefix"]
    held = read_manifest(manifest_path(prefix)).splits["train"].tokens
    config = _config(1000)  # 1000 steps x 8 sequences x 32 tokens
    assert data_passes(config, [prefix], None) == {prefix: pytest.approx(256_000 / held)}
    weighted = data_passes(config, [prefix, prefix], [3.0, 1.0])
    assert weighted == {prefix: pytest.approx(0.25 * 256_000 / held)}  # the later entry wins


def test_a_run_within_one_pass_is_not_warned(tiny_data):
    assert passes_warning(_config(10), [tiny_data["prefix"]], None) is None


def test_a_run_past_one_pass_is_warned_with_the_count(tiny_data):
    prefix = tiny_data["prefix"]
    held = read_manifest(manifest_path(prefix)).splits["train"].tokens
    steps = 2 * held // (8 * 32) + 1  # a little over two passes
    warning = passes_warning(_config(steps), [prefix], None)
    assert warning.startswith(f"warning: the run reads {steps * 8 * 32:,} training tokens")
    assert f"{prefix}: 2.00" in warning and "documents will repeat" in warning

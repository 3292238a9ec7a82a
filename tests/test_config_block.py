"""The block's config keys: choices, a boolean QK-norm refused, and what a checkpoint records."""

import pytest

from lws_megatron.config import block_fingerprint, dump_config, load_config
from lws_megatron.errors import UserError
from tests.helpers import TINY


@pytest.mark.parametrize("value", ["head", "full", "none"])
def test_qk_norm_reads_its_choices(value):
    assert load_config(TINY, [f"model.qk_norm={value}"]).model.qk_norm == value


@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_qk_norm_is_out_of_range_in_one_line(value):
    with pytest.raises(UserError) as err:
        load_config(TINY, [f"model.qk_norm={value}"])
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(
        f"model.qk_norm={value == 'true'} is not allowed; choose one of 'none', 'head', 'full'"
    )


def test_defaults_keep_the_megatron_block():
    m = load_config(TINY).model
    assert (m.norm_placement, m.qk_norm, m.init) == ("pre", "head", "megatron")


@pytest.mark.parametrize(
    "key, value", [("qk_norm", "partial"), ("norm_placement", "sandwich"), ("init", "xavier")]
)
def test_an_unknown_choice_names_the_key_and_the_choices(key, value):
    with pytest.raises(UserError, match=rf"model\.{key}='{value}' is not allowed; choose one of"):
        load_config(TINY, [f"model.{key}={value}"])


def test_a_dumped_config_loads_back_the_same(tmp_path):
    config = load_config(TINY, ["model.qk_norm=none", "model.norm_placement=post"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_a_checkpoint_records_the_block_choices_as_the_config_names_them():
    assert block_fingerprint(load_config(TINY).model) == {"qk_norm": "head"}
    assert block_fingerprint(load_config(TINY, ["model.qk_norm=none"]).model) == {"qk_norm": "none"}
    olmo = load_config(TINY, ["model.qk_norm=full", "model.norm_placement=post"]).model
    assert block_fingerprint(olmo) == {"qk_norm": "full", "norm_placement": "post"}


def test_zero2_takes_tp_with_either_qk_norm_gain_and_pp():
    """DDP reduces and model/grads.py sums the shared gain over TP before DeepSpeed sees any
    gradient, at every stage (the losses: tests/training/test_training.py)."""
    for extra in (["parallel.tp=2", "model.qk_norm=head"], ["parallel.pp=2"]):
        assert load_config(TINY, ["zero.stage=2", *extra]).zero.stage == 2

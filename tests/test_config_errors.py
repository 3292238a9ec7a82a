"""Values a config must refuse in one line naming the file, the key and the allowed range."""

from pathlib import Path

import pytest

from lws_megatron import shapes
from lws_megatron.config import LWSConfig, ModelConfig, load_config
from lws_megatron.errors import UserError

CROWN = Path(__file__).resolve().parents[1] / "configs" / "demo" / "crown.yaml"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lws.ffn_knots=[.nan]"], r"lws.ffn_knots\[0\]=nan must be a finite number"),
        (["lws.ffn_knots=[.inf]"], r"lws.ffn_knots\[0\]=inf must be a finite number"),
        (["lws.attn_knots=[0.5, -.inf]"], r"lws.attn_knots\[1\]=-inf must be a finite number"),
        (["lws.frame_attn=.nan"], r"lws.frame_attn=nan must be a finite number"),
        (["optim.lr=.inf"], r"optim.lr=inf must be a finite number"),
        (["model.init_std=nan"], r"model.init_std='nan' must be a finite number"),
        (["model.rope_theta=.inf"], r"model.rope_theta=inf must be a finite number"),
        (["lws.ffn_multiple=0"], r"lws.ffn_multiple=0: must be at least 1"),
        (
            ["model.make_vocab_size_divisible_by=0"],
            r"model.make_vocab_size_divisible_by=0: must be at least 1",
        ),
        (["checkpoint.interval=-1"], r"checkpoint.interval=-1 is out of range: must be >= 0"),
        (["checkpoint.keep=0"], r"checkpoint.keep=0 is out of range: must be >= 1"),
        (["checkpoint.keep=-2"], r"checkpoint.keep=-2 is out of range: must be >= 1"),
        (
            ["eval.interval=4", "eval.batches=0"],
            r"eval.batches=0 must be >= 1 while eval.interval=4 > 0; set eval.interval=0",
        ),
        (["eval.interval=-1"], r"eval.interval=-1 is out of range: must be >= 0"),
        (["optim.warmup_steps=-1"], r"optim.warmup_steps=-1 is out of range: must be >= 0"),
        (["optim.eps=0"], r"optim.eps=0.0 is out of range: must be > 0"),
        (["optim.eps=-1e-8"], r"optim.eps=-1e-08 is out of range: must be > 0"),
        (["optim.clip_grad=-1"], r"optim.clip_grad=-1.0 is out of range: must be >= 0"),
        (["model.norm_eps=0"], r"model.norm_eps=0.0 is out of range: must be > 0"),
        (
            ["optim.betas=[1.5,-1]"],
            r"optim.betas=\[1.5, -1.0\] is out of range: each value must be in \[0, 1\)",
        ),
        (["optim.betas=[0.9, 1.0]"], r"optim.betas=\[0.9, 1.0\] is out of range"),
        (["optim.min_lr=-1e-5"], r"optim.min_lr=-1e-05 is out of range: must be >= 0"),
        (
            ["optim.lr=1e-3", "optim.min_lr=2e-3"],
            r"optim.min_lr=0.002 must not exceed optim.lr=0.001",
        ),
        (["optim.weight_decay=-0.1"], r"optim.weight_decay=-0.1 is out of range: must be >= 0"),
        (["optim.decay_fraction=1.5"], r"optim.decay_fraction=1.5 is out of range: must be in"),
        (
            ["train.max_nonfinite_steps=0"],
            r"train.max_nonfinite_steps=0 is out of range: must be >= 1",
        ),
        (["train.seed=-1"], r"train.seed=-1 is out of range: must be in \[0, 4294967295\]"),
        (["data.num_workers=-1"], r"data.num_workers=-1 is out of range: must be >= 0"),
        (["train.log_interval=0"], r"train.log_interval=0 is out of range: must be >= 1"),
        (["parallel.tp=0"], r"parallel.tp=0 is out of range: must be >= 1"),
        (["run.dir=''"], r"run.dir is empty, .* in the current directory; name a directory"),
        (["run.dir='  '"], r"run.dir is empty"),
    ],
)
def test_out_of_range_values_are_refused_naming_file_and_key(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(CROWN, overrides)
    text = str(err.value)
    assert text.startswith(f"{CROWN}: ") and "\n" not in text


def test_the_edges_of_each_range_are_accepted():
    config = load_config(
        CROWN,
        [
            "optim.clip_grad=0",
            "optim.warmup_steps=0",
            "optim.weight_decay=0",
            "optim.min_lr=2e-3",
            "optim.lr=2e-3",
            "optim.betas=[0, 0.999]",
            "optim.decay_fraction=1",
            "train.seed=0",
            "eval.interval=0",
            "eval.batches=0",
            "checkpoint.interval=0",
            "checkpoint.keep=1",
            "train.max_nonfinite_steps=1",
            "data.num_workers=0",
        ],
    )
    assert (config.optim.betas, config.checkpoint.keep, config.eval.batches) == ([0.0, 0.999], 1, 0)


@pytest.mark.parametrize("knot", [float("nan"), float("inf")])
def test_shape_engine_refuses_non_finite_knots_by_layer(knot):
    profile = LWSConfig(ffn_knots=(knot,), attn_knots=(1.0,))
    dims = ModelConfig(num_layers=2, d_model=192, d_head=64, vocab_size=512, seq_length=64)
    with pytest.raises(UserError, match=r"layer 0: .*non-finite size; all knots .* finite"):
        shapes.layer_shapes(profile, dims)


@pytest.mark.parametrize("base", ["5", "[x]", "{a: 1}", "''", "true"])
def test_a_base_that_is_not_a_file_name_is_refused_in_one_line(tmp_path, base):
    config = tmp_path / "variant.yaml"
    config.write_text(f"base: {base}\nmodel: {{num_layers: 4}}\n")
    with pytest.raises(UserError, match=r"base=.* should name the YAML file this one extends"):
        load_config(config)


@pytest.mark.parametrize("linked", [False, True])
def test_a_binary_file_as_config_or_base_is_refused_in_one_line(tmp_path, linked):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    config = binary
    if linked:
        config = tmp_path / "variant.yaml"
        config.write_text("base: weights.yaml\n")
    with pytest.raises(UserError, match=rf"{binary}: not a text file \(not UTF-8\)"):
        load_config(config)

"""Config files: inheritance, overrides and the errors a user sees."""

from pathlib import Path

import pytest

from lws_megatron.config import dump_config, load_config
from lws_megatron.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"

SPEC_TABLE = {  # LWS_SPEC.md: name -> (layers, beta knots, alpha knots, framed)
    "baseline-12l": (12, (4.0,), (1.0,), False),
    "baseline-18l": (18, (2.5,), (0.75,), False),
    "vanilla-18l": (18, (1.0, 4.0), (0.5, 1.0), False),
    "framed-18l": (18, (0.5, 4.0), (0.5, 1.0), True),
    "reverse-18l": (18, (4.0, 0.5), (1.0, 0.5), True),
    "crown-18l": (18, (0.5, 3.8, 0.5), (0.5, 1.0, 0.5), True),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_paper_configs_follow_the_spec_table_and_share_the_reference(name):
    config = load_config(PAPER / f"{name}.yaml")
    layers, beta, alpha, framed = SPEC_TABLE[name]
    assert config.model.num_layers == layers
    assert (config.lws.ffn_knots, config.lws.attn_knots, config.lws.framed) == (beta, alpha, framed)
    m = config.model
    assert (m.d_model, m.d_head, m.vocab_size, m.seq_length, m.rope_theta) == (
        768,
        64,
        50280,
        1024,
        500000.0,
    )
    assert (config.lws.gqa, config.lws.kv_group_size, m.tie_embeddings) == ("group_size", 3, False)
    o = config.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad, o.schedule) == (
        6e-4,
        [0.9, 0.95],
        1e-8,
        0.01,
        1.0,
        "constant",
    )
    assert config.train.global_batch_size * config.train.max_steps * m.seq_length == 5_111_808_000


def test_demo_configs_have_equal_params_and_run_at_tp2():
    totals = {}
    for path in sorted((ROOT / "configs" / "demo").glob("[!_]*.yaml")):
        summary = load_config(path, ["parallel.tp=2"]).summary()
        totals[path.stem] = summary.total_params
        assert all(
            row.num_query_heads % 2 == 0 and row.num_kv_heads % 2 == 0 for row in summary.layers
        )
        assert len({row.ffn_hidden_size for row in summary.layers}) > 1 or path.stem == "baseline"
    assert set(totals) == {"baseline", "vanilla", "framed", "reverse", "crown"}
    assert max(totals.values()) / min(totals.values()) < 1.01


def test_dotted_overrides_parse_yaml_values():
    config = load_config(
        PAPER / "crown-18l.yaml",
        ["model.num_layers=12", "lws.ffn_knots=[1.0,4.0]", "train.precision=fp32", "optim.lr=1e-3"],
    )
    assert config.model.num_layers == 12
    assert config.lws.ffn_knots == (1.0, 4.0)
    assert config.train.precision == "fp32"
    assert config.optim.lr == 1e-3


def test_resolved_config_round_trips(tmp_path):
    config = load_config(PAPER / "crown-18l.yaml", ["train.max_steps=7"])
    dumped = tmp_path / "config.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (
            "model: {num_layrs: 3}\n",
            [],
            r"unknown key model.num_layrs \(did you mean 'num_layers'\?\)",
        ),
        ("modle: {}\n", [], r"unknown key modle .*valid keys: run, model, lws"),
        ("model: {num_layers: three}\n", [], r"model.num_layers='three' should be int, got str"),
        ("model: {num_layers: 2.5}\n", [], r"model.num_layers=2.5 should be int"),
        (
            "lws: {gqa: grouped}\n",
            [],
            r"lws.gqa='grouped' is not allowed; choose one of 'group_size', 'fixed_kv'",
        ),
        ("zero: {stage: 4}\n", [], r"zero.stage=4 is not allowed"),
        ("model: {d_model: 100}\n", [], r"model.d_head=64 must divide model.d_model=100"),
        (
            "train: {global_batch_size: 6, micro_batch_size: 4}\n",
            [],
            r"multiple of train.micro_batch_size",
        ),
        ("zero: {stage: 3}\n", [], r"zero.stage=3 is not allowed; choose one of 0, 1, 2"),
        ("model: [1, 2]\n", [], r"model must be a mapping"),
        ("model: {num_layers: 4\n", [], r"not valid YAML"),
        ("{}", ["model.num_layers"], r"write it as section.key=value"),
        ("{}", ["lws.ffn_knots=[0.0, 4.0]", "model.num_layers=4"], r"layer 0: .*non-positive"),
        (
            "{}",
            ["parallel.tp=2", "lws.attn_knots=[0.75]", "model.num_layers=2"],
            r"layer 0 has 9 query / 3 KV heads, not divisible by TP=2",
        ),
    ],
)
def test_bad_configs_are_refused_with_file_key_and_fix(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as err:
        load_config(path, overrides)
    assert str(path) in str(err.value) or str(err.value).startswith("override")


def test_missing_and_cyclic_bases(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_variant_overrides_only_what_it_states(tmp_path):
    write(tmp_path, "model: {num_layers: 6, d_model: 256}\nlws: {framed: true}\n", "ref.yaml")
    child = write(tmp_path, "base: ref.yaml\nmodel: {num_layers: 8}\n")
    config = load_config(child)
    assert (config.model.num_layers, config.model.d_model, config.lws.framed) == (8, 256, True)


def test_override_strings_keep_their_text_whole():
    config = load_config(PAPER / "crown-18l.yaml", ["run.dir=runs/crown's run #1"])
    assert config.run.dir == "runs/crown's run #1"

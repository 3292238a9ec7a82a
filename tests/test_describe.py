"""`describe`: the JSON contract, side-by-side text, plots, budget matching and CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lws_megatron import budget
from lws_megatron.describe import main
from lws_megatron.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CROWN = str(ROOT / "configs/paper/crown-18l.yaml")
VANILLA = str(ROOT / "configs/paper/vanilla-18l.yaml")
BASELINE = str(ROOT / "configs/paper/baseline-18l.yaml")


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_contract(capsys):
    report = run_json(capsys, VANILLA)
    assert report["config"] == "vanilla-18l"
    assert len(report["layers"]) == 18
    for layer in report["layers"]:
        for key in (
            "ffn_hidden_size",
            "num_query_heads",
            "num_kv_heads",
            "params",
            "flops_per_token",
        ):
            assert type(layer[key]) is int
    assert report["total_params"] == 179_742_976
    assert report["embedding_params"] == 50304 * 768
    assert report["total_params"] == (
        sum(row["params"] for row in report["layers"]) + 2 * report["embedding_params"] + 768
    )


def test_several_configs_give_a_list_and_overrides_apply_to_each(capsys):
    reports = run_json(capsys, VANILLA, CROWN, "model.num_layers=9")
    assert [r["config"] for r in reports] == ["vanilla-18l", "crown-18l"]
    assert all(len(r["layers"]) == 9 for r in reports)


def test_text_prints_configs_side_by_side_with_totals(capsys):
    assert main([VANILLA, CROWN]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "vanilla-18l" in out[0] and "crown-18l" in out[0]
    row0 = out[2].split()
    assert row0[:4] == ["0", "768", "6", "2"] and row0[7:10] == ["3072", "12", "4"]
    assert "179,742,976" in next(row for row in out if row.startswith("total params"))


def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "profiles.png"
    assert main([VANILLA, CROWN, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_tp_flag_with_tp_aware_rounding_reports_moved_layers(capsys):
    report = run_json(capsys, CROWN, "--tp", "2", "lws.tp_aware_rounding=true")
    assert report["tp"] == 2
    assert all(row["num_kv_heads"] % 2 == 0 for row in report["layers"])
    assert {"layer": 1, "heads_before": 9, "heads_after": 12} in report["tp_adjustments"]


@pytest.mark.parametrize(
    "flag, target",
    [("--match-params", "180M"), ("--match-params", "120M"), ("--match-flops", "1.1G")],
)
def test_budget_matching_lands_within_half_a_percent_keeping_shape(capsys, flag, target):
    assert main([CROWN, flag, target, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert captured.err.startswith("crown-18l: lws.ffn_knots=[")
    key = "total_params" if flag == "--match-params" else "flops_per_token"
    assert abs(report[key] / budget.parse_amount(target) - 1) <= 0.005
    ffn = report["ffn_knots"]
    assert ffn[0] == ffn[2] < ffn[1]  # still a crown


def test_isotropic_baseline_matched_to_a_profile_by_params(capsys):
    vanilla = run_json(capsys, VANILLA)["total_params"]
    report = run_json(capsys, BASELINE, "--match-params", str(vanilla))
    assert abs(report["total_params"] / vanilla - 1) <= 0.005
    assert len({(row["ffn_hidden_size"], row["num_query_heads"]) for row in report["layers"]}) == 1


def test_unreachable_budget_says_how_close_it_gets():
    from lws_megatron.config import load_config

    config = load_config(BASELINE)
    with pytest.raises(UserError, match=r"closest this profile gets to 914,817,024 flops"):
        budget.match_budget(config.lws, config.model, 914_817_024, "flops")


def test_parse_amount():
    assert budget.parse_amount("180M") == 180_000_000
    assert budget.parse_amount("1.1b") == 1_100_000_000
    assert budget.parse_amount("9e8") == 900_000_000
    with pytest.raises(UserError, match="K/M/B suffix"):
        budget.parse_amount("lots")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [CROWN, "--tp", "2"],
            "crown-18l.yaml: layer 1 has 9 query / 3 KV heads, not divisible by TP=2",
        ),
        ([CROWN, "model.num_layers=2"], "needs at least 3 layers, got 2"),
        (["missing.yaml"], "missing.yaml: config file not found"),
        (
            [VANILLA, "lws.attn_knots=[0.1,1.0]"],
            "layer 0: attn multiplier 0.1 gives 1.2 query heads",
        ),
        ([VANILLA, "model.num_layers=1"], "needs at least 2 layers"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "lws_megatron.describe", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_shape_engine_does_not_import_torch():
    code = (
        "import sys, lws_megatron.describe, lws_megatron.budget; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

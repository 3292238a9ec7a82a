"""The run report: numbers come from metrics.jsonl, figures are real PNGs, bad input is one line."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from lws_megatron.config import dump_config, load_config
from lws_megatron.report import main
from lws_megatron.report.colors import run_colors
from lws_megatron.report.runs import load_run, read_metrics

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
SHA_A, SHA_B = "a" * 64, "b" * 64


def make_run(
    root: Path,
    profile: str,
    *,
    name: str = "",
    final_loss: float = 4.0,
    tokenizer: str = SHA_A,
    valid: str = SHA_A,
    resume_from: int | None = None,
    finished: bool = True,
    steps: int = 200,
    overrides: tuple[str, ...] = (),
    load: float = 1.0,
) -> Path:
    """A run directory `root/profile` exactly as the training runtime writes it, its config
    the demo profile's with `overrides`.

    With `resume_from`, the run logs to the end, then restarts from that step and logs
    again with lower losses, as a resumed run appends to metrics.jsonl.
    """
    run_dir = root / profile
    run_dir.mkdir(parents=True)
    config = load_config(
        DEMO / f"{profile}.yaml",
        [
            f"run.dir={run_dir}",
            f"run.name={name!r}",
            "train.log_interval=10",
            "eval.interval=50",
            *overrides,
        ],
    )
    (run_dir / "config.yaml").write_text(dump_config(config))
    summary = config.summary()
    tokens_per_step = config.train.global_batch_size * config.model.seq_length
    interval, eval_interval = config.train.log_interval, config.eval.interval

    def loss(step: int, shift: float) -> float:
        wiggle = 0.05 * math.sin(step * 1.7 + len(profile))
        return final_loss + (8.3 - final_loss) * math.exp(-step / 40) + wiggle + shift

    def lines(first: int, shift: float, t0: float) -> list[dict]:
        out = []
        for step in range(first, steps + 1, interval):
            t = t0 + 0.5 * step
            out.append(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "loss": loss(step, shift),
                    "lr": 1e-3,
                    "grad_norm": 0.9,
                    "tokens_per_s": 8000.0 + step,
                    "mfu": 0.01 + step / 1e5,
                    "step_time_s": 0.5,
                    "mem_gb": 1.2,
                    "skipped_steps": 0,
                    "load_avg": load,
                    "time_s": t,
                }
            )
            if step % eval_interval == 0:
                v = loss(step, shift) + 0.1
                out.append(
                    {
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "val_loss": v,
                        "val_ppl": math.exp(v),
                        "time_s": t + 0.1,
                    }
                )
        return out

    records = lines(interval, 0.0, 0.0)
    if resume_from is not None:
        records += lines(resume_from, -0.2, 150.0)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "run_info.json").write_text(
        json.dumps(
            {
                "name": config.run.name or run_dir.name,
                "total_params": summary.total_params,
                "flops_per_token": summary.flops_per_token,
                "tokenizer_sha256": tokenizer,
                "valid_data_sha256": valid,
                "valid_data": ["demo_out/data/demo_valid"],
                "world_size": 1,
                "tp": 1,
                "pp": 1,
                "dp": 1,
                "device": "cpu",
                "peak_flops": 1e12,
                "peak_flops_source": "CPU peak 1000.0 GFLOP/s: measured once on this machine",
                "host_cpus": 2,
                "started": "2025-01-01T00:00:00+00:00",
            }
        )
    )
    if finished:
        last = records[-1]
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "wall_time_s": last["time_s"],
                    "steps": steps,
                    "tokens": steps * tokens_per_step,
                    "final_loss": loss(steps, 0.0),
                    "final_val_loss": None,
                    "final_val_ppl": None,
                    "tokens_per_s": 8000.0,
                    "mfu": 0.01,
                }
            )
        )
    return run_dir


def last_of(run_dir: Path, key: str) -> float:
    """The value of `key` in the last line that has it: what the table must show."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if key in json.loads(line)][-1][key]


def table(report: str) -> dict[str, dict[str, str]]:
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in rows[2:]}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("runs")
    runs = [
        make_run(root, "baseline", name="baseline", final_loss=4.2),
        make_run(root, "crown", name="crown", final_loss=4.0, resume_from=150),
        make_run(root, "framed", name="framed", final_loss=4.1, finished=False),
    ]
    out = root / "report"
    assert main([*map(str, runs), "--output", str(out)]) == 0
    return out, runs


def test_table_numbers_are_the_metrics(rendered):
    out, runs = rendered
    rows = table((out / "report.md").read_text())
    assert list(rows) == ["baseline", "crown", "framed"]
    for run_dir in runs:
        row = rows[run_dir.name]
        assert row["final train loss"] == f"{last_of(run_dir, 'loss'):.4f}"
        assert row["final val loss"] == f"{last_of(run_dir, 'val_loss'):.4f}"
        assert row["val ppl"] == f"{last_of(run_dir, 'val_ppl'):.2f}"
        info = json.loads((run_dir / "run_info.json").read_text())
        assert row["params (M)"] == f"{info['total_params'] / 1e6:.2f}"


def test_resumed_steps_keep_the_last_record(rendered):
    _, runs = rendered
    crown = runs[1]
    train, evals, wall = read_metrics(crown / "metrics.jsonl")
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and len(evals) == len({r["step"] for r in evals})
    first_pass = json.loads((crown / "metrics.jsonl").read_text().splitlines()[-1])
    assert train[-1]["loss"] == last_of(crown, "loss") and wall == first_pass["time_s"]
    resumed_at_150 = next(r for r in train if r["step"] == 150)
    assert resumed_at_150["loss"] < next(r for r in train if r["step"] == 140)["loss"]


def test_figures_are_real_pngs(rendered):
    out, _ = rendered
    for name in ("loss.png", "throughput.png", "profiles.png"):
        width, height = png_size(out / name)
        assert width >= 1000 and height >= 400 and (out / name).stat().st_size > 20_000
        assert f"]({name})" in (out / "report.md").read_text()
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_findings_are_computed(rendered):
    report = (rendered[0] / "report.md").read_text()
    assert "Warning" not in report
    assert "Lowest final validation loss: **crown**" in report
    assert "relative to baseline" in report
    assert "No summary.json for framed" in report


def test_throughput_shows_the_spread_of_its_intervals_and_what_mfu_divides_by(rendered):
    out, runs = rendered
    report = (out / "report.md").read_text()
    row = table(report)["baseline"]
    steady = [8000.0 + step for step in range(20, 201, 10)]  # the intervals after the first
    mean = sum(steady) / len(steady)
    assert row["tokens/s"] == f"{mean:,.0f} ({min(steady):,.0f}-{max(steady):,.0f})"
    assert row["MFU"].endswith(f"({0.0102:.1%}-{0.012:.1%})")
    assert "MFU is measured against: CPU peak 1000.0 GFLOP/s: measured once" in report
    assert "shared" not in report


def test_a_shared_machine_is_said_and_different_peaks_warned(tmp_path):
    runs = [
        make_run(tmp_path, "baseline", name="baseline", steps=60),
        make_run(tmp_path, "crown", name="crown", steps=60, load=5.5),
    ]
    info = json.loads((runs[0] / "run_info.json").read_text())
    info["peak_flops_source"] = "CPU peak 30.0 GFLOP/s: measured at start"
    (runs[0] / "run_info.json").write_text(json.dumps(info))
    assert main([*map(str, runs), "--output", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    [note] = [line for line in report.splitlines() if line.startswith("> **Note:**")]
    assert (
        "machine was shared during crown (load 5.5 on 2 cores)" in note and "baseline" not in note
    )
    [warning] = [line for line in report.splitlines() if line.startswith("> **Warning:**")]
    assert "different peaks" in warning


def test_warns_when_tokenizer_or_validation_data_differ(tmp_path):
    runs = [
        make_run(tmp_path, "baseline", name="baseline", steps=60),
        make_run(tmp_path, "vanilla", name="vanilla", tokenizer=SHA_B, valid=SHA_B, steps=60),
    ]
    assert main([*map(str, runs), "--output", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    warnings = [line for line in report.splitlines() if line.startswith("> **Warning:**")]
    assert len(warnings) == 2
    assert "tokenizers" in warnings[0] and "not comparable" in warnings[0]
    assert all(word in warnings[1] for word in ("validation data", "baseline", "vanilla"))
    assert report.index("Warning") < report.index("| run |")


def test_unnamed_run_takes_its_directory_name(tmp_path):
    assert load_run(make_run(tmp_path, "crown", name="", steps=20)).name == "crown"


def test_colours_follow_names_not_order():
    a = run_colors(["crown", "baseline", "mine", "yours"])
    b = run_colors(["yours", "mine", "baseline", "crown"])
    assert a == b and len(set(a.values())) == 4
    assert run_colors(["baseline-12l"])["baseline-12l"] == a["baseline"]


def append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "metrics.jsonl").unlink(), "metrics.jsonl: not found"),
        (lambda d: (d / "metrics.jsonl").write_text(""), "metrics.jsonl: no training records"),
        (
            lambda d: append(d / "metrics.jsonl", '{"step": 210, "loss": 4.'),
            "metrics.jsonl:25: not valid JSON",
        ),
        (
            lambda d: append(d / "metrics.jsonl", '{"step": 210, "loss": 4.0}'),
            "metrics.jsonl:25: training record lacks tokens",
        ),
        (lambda d: (d / "run_info.json").write_text("{}"), "run_info.json: lacks total_params"),
    ],
)
def test_bad_run_dir_is_one_line_error(tmp_path, capsys, damage, message):
    run_dir = make_run(tmp_path, "baseline")
    damage(run_dir)
    assert main([str(run_dir), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and str(run_dir) in err
    assert not (tmp_path / "out" / "report.md").exists()


def test_missing_dir_and_repeated_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err
    run_dir = str(make_run(tmp_path, "baseline", steps=20))
    assert main([run_dir, run_dir, "--output", str(tmp_path / "out")]) == 2
    assert "given twice" in capsys.readouterr().err

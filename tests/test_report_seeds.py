"""Seeds in the report: runs of one name and config over several seeds are one profile, whose
row gives the mean and sample standard deviation of the final losses over the seeds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from test_report import last_of, make_run, png_size, table

from lws_megatron.report import main
from lws_megatron.report.runs import group_runs, load_run
from lws_megatron.report.stats import Spread

# The loss each seed's curve approaches (make_run); crown is below the baseline at every seed.
BASELINE = {1: 4.20, 2: 4.26, 3: 4.17}
CROWN = {1: 4.05, 2: 4.13, 3: 4.04}


def seeded_run(root: Path, profile: str, seed: int, final_loss: float, *overrides: str) -> Path:
    return make_run(
        root / f"seed{seed}",
        profile,
        name=profile,
        final_loss=final_loss,
        overrides=(f"train.seed={seed}", *overrides),
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, dict[tuple[str, int], Path]]:
    """Three seeds of baseline and crown, as launch/sweep.py orders them, and one framed run."""
    root = tmp_path_factory.mktemp("sweep")
    dirs = {}
    for seed in BASELINE:
        dirs["baseline", seed] = seeded_run(root, "baseline", seed, BASELINE[seed])
        dirs["crown", seed] = seeded_run(root, "crown", seed, CROWN[seed])
    dirs["framed", 9] = seeded_run(root, "framed", 9, 4.1)
    out = root / "report"
    assert main([*map(str, dirs.values()), "--output", str(out)]) == 0
    return out, dirs


def finals(dirs: dict[tuple[str, int], Path], profile: str, key: str) -> dict[int, float]:
    return {seed: last_of(d, key) for (p, seed), d in dirs.items() if p == profile}


def test_table_gives_mean_and_sample_std_per_profile(sweep):
    out, dirs = sweep
    rows = table((out / "report.md").read_text())
    assert list(rows) == ["baseline", "crown", "framed"]
    for profile in ("baseline", "crown"):
        assert rows[profile]["seeds"] == "3"
        for column, key in (("final train loss", "loss"), ("final val loss", "val_loss")):
            values = list(finals(dirs, profile, key).values())
            assert rows[profile][column] == (
                f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
            )
    assert rows["framed"]["seeds"] == "1"
    assert rows["framed"]["final val loss"] == f"{last_of(dirs['framed', 9], 'val_loss'):.4f}"


def test_difference_to_baseline_is_paired_by_seed(sweep):
    out, dirs = sweep
    report = (out / "report.md").read_text()
    crown, base = finals(dirs, "crown", "val_loss"), finals(dirs, "baseline", "val_loss")
    diffs = [crown[seed] - base[seed] for seed in BASELINE]
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    ref = statistics.mean(base.values())
    assert f"crown {mean:+.4f} ± {std:.4f} ({mean / ref:+.2%}; paired over seeds 1, 2, 3)" in report
    framed = last_of(dirs["framed", 9], "val_loss") - ref  # seed 9: nothing to pair with
    assert (
        f"framed {framed:+.4f} ({framed / ref:+.2%}; a difference of means, as fewer than "
        "two seeds are shared with baseline)"
    ) in report
    assert (
        f"Seed-to-seed standard deviation of the final validation loss: baseline "
        f"{statistics.stdev(base.values()):.4f} (3 seeds), crown "
        f"{statistics.stdev(crown.values()):.4f} (3 seeds)"
    ) in report
    assert "Lowest final validation loss: **crown**" in report and "(mean of 3 seeds)" in report


def test_loss_figure_draws_every_seed(sweep):
    out, _ = sweep
    width, height = png_size(out / "loss.png")
    assert width >= 1000 and height >= 400 and not list(out.glob(".*tmp*"))


def test_spread_is_the_sample_standard_deviation():
    assert Spread.of([4.0]) == Spread(4.0, None)
    spread = Spread.of([4.0, 4.2, 4.7])
    assert spread.mean == pytest.approx(statistics.mean([4.0, 4.2, 4.7]), abs=1e-15)
    assert spread.std == pytest.approx(statistics.stdev([4.0, 4.2, 4.7]), abs=1e-15)
    diverged = Spread.of([4.0, math.inf, 4.1])
    assert math.isnan(diverged.mean) and math.isnan(diverged.std)


def test_only_seeds_of_one_experiment_are_grouped(tmp_path):
    """Checkpointing is no part of the experiment, the learning rate is: runs that differ in
    it keep their own rows, told apart by directory."""
    a = seeded_run(tmp_path, "crown", 1, 4.0, "checkpoint.interval=10")
    b = seeded_run(tmp_path, "crown", 2, 4.1)
    c = seeded_run(tmp_path / "lr", "crown", 3, 4.2, "optim.lr=1e-3")
    profiles = group_runs([load_run(r) for r in (b, c, a)])
    assert [[r.path for r in p.runs] for p in profiles] == [[a, b], [c]]  # ordered by seed
    assert [p.name for p in profiles] == [f"crown ({tmp_path})", f"crown ({c})"]


def test_a_repeated_seed_groups_nothing(tmp_path):
    """A second run at a seed is a rerun, not a new sample, and which of the two belongs to the
    sample is unknown: every run keeps its own row."""
    runs = [
        seeded_run(tmp_path, "crown", 1, 4.0),
        seeded_run(tmp_path, "crown", 2, 4.1),
        seeded_run(tmp_path / "again", "crown", 2, 4.3),
    ]
    profiles = group_runs([load_run(r) for r in runs])
    assert [p.name for p in profiles] == [f"crown ({r})" for r in runs]


def test_single_runs_render_without_a_seeds_column(tmp_path):
    runs = [
        seeded_run(tmp_path, "crown", 1, 4.0),
        seeded_run(tmp_path / "lr", "crown", 1, 4.2, "optim.lr=1e-3"),
    ]
    assert main([*map(str, runs), "--output", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    header = report[report.index("| run |") :].splitlines()[0]
    assert "seeds" not in header and "± " not in report and "mean over" not in report


def test_same_directory_spelled_twice_is_refused(tmp_path, capsys, monkeypatch):
    run = seeded_run(tmp_path, "crown", 1, 4.0)
    monkeypatch.chdir(tmp_path)
    assert main([str(run), str(run.relative_to(tmp_path)), "--output", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "given twice" in err and str(run.relative_to(tmp_path)) in err


def test_a_diverged_seed_leaves_its_profile_without_a_mean(tmp_path):
    runs = [seeded_run(tmp_path, "crown", 1, 4.0), seeded_run(tmp_path, "crown", 2, 4.1)]
    with (runs[1] / "metrics.jsonl").open("a") as f:
        f.write(
            '{"step": 210, "tokens": 1, "loss": NaN, "tokens_per_s": 1.0, "mfu": 0.0, '
            '"time_s": 200.0}\n'
        )
    assert main([*map(str, runs), "--output", str(tmp_path / "out")]) == 0
    row = table((tmp_path / "out" / "report.md").read_text())["crown"]
    assert row["final train loss"] == "—" and " ± " in row["final val loss"]

"""`python -m lws_megatron.report RUN_DIR... --output DIR`: compare training runs.

Writes `DIR/report.md` with a table and a few computed findings, and the figures
`loss.png`, `throughput.png` and `profiles.png`. Every number is read from the runs'
`metrics.jsonl` and `run_info.json`, so the report cannot drift from the runs. Runs that share
a name and a config apart from `train.seed` (a seed sweep, `launch/sweep.py`) are one profile:
one row with the mean and sample standard deviation of the final losses over the seeds.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from lws_megatron.cli import HelpFormatter
from lws_megatron.describe import describe_json, plot_profiles
from lws_megatron.errors import cli_entry
from lws_megatron.report.colors import run_colors
from lws_megatron.report.figures import plot_loss, plot_throughput
from lws_megatron.report.markdown import render_markdown
from lws_megatron.report.runs import group_runs, load_runs
from lws_megatron.report.stats import profile_stats


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (same suffix, for matplotlib) and move it into place."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(run_dirs: list[str | Path], output_dir: str | Path) -> Path:
    """Read the runs, draw the figures and write `output_dir/report.md`; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    profiles = group_runs(load_runs(run_dirs))
    stats = {p.name: profile_stats(p) for p in profiles}
    colors = run_colors([p.name for p in profiles])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "Loss": "loss.png",
        "Throughput": "throughput.png",
        "Per-layer parameter profiles": "profiles.png",
    }
    with _atomic(out / figures["Loss"]) as tmp:
        plot_loss(profiles, colors, tmp)
    with _atomic(out / figures["Throughput"]) as tmp:
        plot_throughput(profiles, stats, colors, tmp)
    with _atomic(out / figures["Per-layer parameter profiles"]) as tmp:
        plot_profiles(
            [describe_json(p.name, p.runs[0].config, int(p.runs[0].info["tp"])) for p in profiles],
            str(tmp),
            colors=colors,
            ncols=3,
        )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = out / "report.md"
    with _atomic(report) as tmp:
        tmp.write_text(render_markdown(profiles, stats, figures, date))
    return report


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lws_megatron.report",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="where report.md and the figures go (created if missing)",
    )
    args = parser.parse_args(argv)
    print(write_report(args.run_dirs, args.output))
    return 0

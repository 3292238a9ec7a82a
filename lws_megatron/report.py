"""`python -m lws_megatron.report RUN_DIR... --output DIR`: compare training runs.

Writes `DIR/report.md` with a table and a few computed findings, and the figures
`loss.png`, `throughput.png` and `profiles.png`. Every number is read from the runs'
`metrics.jsonl` and `run_info.json`, so the report cannot drift from the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from lws_megatron.config import Config, load_config
from lws_megatron.describe import describe_json, plot_profiles
from lws_megatron.errors import UserError, cli_entry

# The paper's profiles keep their colour in every report; baseline is the dark reference.
PROFILE_COLORS = {
    "baseline": "#333333",
    "vanilla": "#1f77b4",
    "framed": "#2ca02c",
    "reverse": "#d62728",
    "crown": "#9467bd",
}
OTHER_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")

TRAIN_KEYS = ("step", "tokens", "loss", "tokens_per_s", "mfu", "time_s")
EVAL_KEYS = ("step", "tokens", "val_loss", "val_ppl", "time_s")
INFO_KEYS = ("total_params", "flops_per_token", "tokenizer_sha256", "valid_data_sha256",
             "tp", "world_size", "device")
ZOOM_FRACTION = 0.3  # the zoomed loss panel shows the last 30% of tokens
DPI = 150


@dataclass(frozen=True)
class Run:
    """One run directory, read and checked; `train`/`evals` hold one record per step."""

    name: str
    path: Path
    config: Config
    info: dict[str, Any]
    train: tuple[dict[str, Any], ...]
    evals: tuple[dict[str, Any], ...]
    wall_time_s: float
    finished: bool


@dataclass(frozen=True)
class RunStats:
    """The table's numbers for one run."""

    params: int
    flops_per_token: int
    tokens: int
    final_loss: float
    final_val_loss: float | None
    final_val_ppl: float | None
    tokens_per_s: float
    mfu: float
    wall_time_s: float


# ---------------------------------------------------------------- reading (pure)


def read_metrics(path: Path) -> tuple[list[dict], list[dict], float]:
    """Training and evaluation records by ascending step, and the last logged time_s.

    A resumed run appends; a step logged twice keeps its last record of each kind.
    """
    if not path.is_file():
        raise UserError(f"{path}: not found; is {path.parent} a training run directory?")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    last_time = None
    for lineno, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        record = _parse_record(text, f"{path}:{lineno}")
        (evals if "val_loss" in record else train)[record["step"]] = record
        last_time = record["time_s"]
    if not train:
        raise UserError(f"{path}: no training records yet; the run has logged nothing to report")
    return ([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], last_time)


def _parse_record(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}); fix or delete the line") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind, keys = ("evaluation", EVAL_KEYS) if "val_loss" in record else ("training", TRAIN_KEYS)
    missing = [k for k in keys if k not in record]
    if missing:
        raise UserError(f"{where}: {kind} record lacks {', '.join(missing)}")
    bad = [f"{k}={record[k]!r}" for k in keys
           if isinstance(record[k], bool) or not isinstance(record[k], (int, float))]
    if bad:
        raise UserError(f"{where}: {', '.join(bad)} should be numbers")
    return record


def read_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: not found; is {path.parent} a training run directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}")
    return data


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; give training run directories")
    config = load_config(path / "config.yaml")
    info = read_json(path / "run_info.json", INFO_KEYS)
    train, evals, wall = read_metrics(path / "metrics.jsonl")
    return Run(
        name=config.run.name or path.resolve().name,
        path=path,
        config=config,
        info=info,
        train=tuple(train),
        evals=tuple(evals),
        wall_time_s=wall,
        finished=(path / "summary.json").is_file(),
    )


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """Load every run; runs sharing a name are told apart by their directory."""
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    runs = [
        replace(r, name=f"{r.name} ({r.path})") if names.count(r.name) > 1 else r
        for r in runs
    ]
    labels = [r.name for r in runs]
    repeated = sorted({n for n in labels if labels.count(n) > 1})
    if repeated:
        raise UserError(f"run directory given twice: {', '.join(repeated)}")
    return runs


# ---------------------------------------------------------------- aggregating (pure)


def run_stats(run: Run) -> RunStats:
    """Final losses from the last records; speed is the mean without the first (warm-up)
    interval."""
    last, steady = run.train[-1], run.train[1:] or run.train
    final_eval = run.evals[-1] if run.evals else None
    return RunStats(
        params=int(run.info["total_params"]),
        flops_per_token=int(run.info["flops_per_token"]),
        tokens=int(last["tokens"]),
        final_loss=float(last["loss"]),
        final_val_loss=float(final_eval["val_loss"]) if final_eval else None,
        final_val_ppl=float(final_eval["val_ppl"]) if final_eval else None,
        tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
        mfu=sum(r["mfu"] for r in steady) / len(steady),
        wall_time_s=float(run.wall_time_s),
    )


def profile_key(name: str) -> str | None:
    """The known profile a run name refers to ("crown-18l" -> "crown"), if any."""
    return next((w for w in re.split(r"[^a-z0-9]+", name.lower()) if w in PROFILE_COLORS), None)


def run_colors(names: list[str]) -> dict[str, str]:
    """One colour per run, from its name alone, so it matches across figures and reports."""
    colors: dict[str, str] = {}
    for name in sorted(names):
        key = profile_key(name)
        if key and PROFILE_COLORS[key] not in colors.values():
            colors[name] = PROFILE_COLORS[key]
    rest = sorted(n for n in names if n not in colors)
    colors.update({n: OTHER_COLORS[i % len(OTHER_COLORS)] for i, n in enumerate(rest)})
    return colors


def baseline_run(runs: list[Run]) -> Run | None:
    """The single run named after the baseline profile; none when absent or ambiguous."""
    found = [r for r in runs if profile_key(r.name) == "baseline"]
    return found[0] if len(found) == 1 else None


def comparability_warnings(runs: list[Run]) -> list[str]:
    """A warning per fingerprint (tokenizer, validation data) on which the runs disagree."""
    warnings = []
    for key, what, consequence in (
        ("tokenizer_sha256", "tokenizers", "Their losses and perplexities are not comparable"),
        ("valid_data_sha256", "validation data", "Their validation losses are not comparable"),
    ):
        groups: dict[str, list[str]] = {}
        for run in runs:
            groups.setdefault(str(run.info[key]), []).append(run.name)
        if len(groups) > 1:
            listing = "; ".join(
                f"{', '.join(names)} ({key} {digest[:12] or 'empty'})"
                for digest, names in groups.items()
            )
            warnings.append(f"The runs use different {what}: {listing}. {consequence}.")
    return warnings


def findings(runs: list[Run], stats: dict[str, RunStats], warned: bool) -> list[str]:
    """A few sentences computed from the numbers: who is best, by how much, and caveats."""
    lines = []
    unevaluated = [r.name for r in runs if stats[r.name].final_val_loss is None]
    key, label = ("final_loss", "training") if unevaluated else ("final_val_loss", "validation")
    if unevaluated and len(unevaluated) < len(runs):
        lines.append(f"No evaluation logged for {', '.join(unevaluated)}, so runs are compared "
                     "on training loss.")
    # A run whose last logged loss is not finite (diverged) is left out of the ranking.
    losses = {r.name: v for r in runs if math.isfinite(v := getattr(stats[r.name], key))}
    if losses:
        best = min(losses, key=losses.get)
        caveat = " (but see the warning above: not all runs are comparable)" if warned else ""
        lines.append(f"Lowest final {label} loss: **{best}**, {losses[best]:.4f} nats{caveat}.")
    base = baseline_run(runs)
    if base is not None and base.name in losses and len(losses) > 1:
        ref = losses[base.name]
        deltas = ", ".join(
            f"{name} {value - ref:+.4f} ({(value - ref) / ref:+.2%})"
            for name, value in sorted(losses.items(), key=lambda item: item[1])
            if name != base.name
        )
        lines.append(f"Final {label} loss relative to {base.name} ({ref:.4f} nats): {deltas}.")
    fastest = max(stats, key=lambda n: stats[n].tokens_per_s)
    slowest = min(stats, key=lambda n: stats[n].tokens_per_s)
    if fastest != slowest:
        lines.append(
            f"Highest throughput: {fastest}, {stats[fastest].tokens_per_s:,.0f} tokens/s "
            f"({stats[fastest].mfu:.2%} MFU); lowest: {slowest}, "
            f"{stats[slowest].tokens_per_s:,.0f} tokens/s ({stats[slowest].mfu:.2%} MFU)."
        )
    tokens = {s.tokens for s in stats.values()}
    if len(tokens) > 1:
        ends = ", ".join(f"{n} {_si(s.tokens)}" for n, s in stats.items())
        lines.append(f"The runs stopped at different token counts ({ends}): their final losses "
                     "are taken at different points of training.")
    else:
        lines.append(f"Every run consumed {_si(tokens.pop())} training tokens.")
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished:
        lines.append(f"No summary.json for {', '.join(unfinished)}: still running or stopped "
                     "early; the numbers are those of the last logged step.")
    return lines


# ---------------------------------------------------------------- formatting (pure)


def _si(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, fmt)


TABLE_COLUMNS = ("run", "params (M)", "GFLOPs/token", "final train loss", "final val loss",
                 "val ppl", "tokens/s", "MFU", "wall time")


def render_table(runs: list[Run], stats: dict[str, RunStats]) -> str:
    rows = [
        (
            r.name,
            f"{s.params / 1e6:.2f}",
            f"{s.flops_per_token / 1e9:.4g}",
            _num(s.final_loss, ".4f"),
            _num(s.final_val_loss, ".4f"),
            _num(s.final_val_ppl, ".2f"),
            f"{s.tokens_per_s:,.0f}",
            f"{s.mfu:.2%}",
            _duration(s.wall_time_s),
        )
        for r, s in ((r, stats[r.name]) for r in runs)
    ]
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join([":--"] + ["--:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(runs: list[Run], stats: dict[str, RunStats], figures: dict[str, str],
                    date: str) -> str:
    warnings = comparability_warnings(runs)
    parts = [
        "# LWS training report",
        "",
        f"{date}. Read from {len(runs)} run directories: "
        + ", ".join(f"`{r.path}`" for r in runs) + ".",
        "",
        "Final losses are in nats per token at the last logged step (validation: last evaluation); "
        "tokens/s and MFU are means over the logged intervals after the first; "
        "wall time is the last logged `time_s`.",
        "",
    ]
    parts += [f"> **Warning:** {w}\n" for w in warnings]
    parts += [render_table(runs, stats), "", "## Findings", ""]
    parts += [f"- {line}" for line in findings(runs, stats, bool(warnings))]
    for title, file in figures.items():
        parts += ["", f"## {title}", "", f"![{title}]({file})"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plotting (the edge)


def _smooth(values: list[float]) -> list[float]:
    """A light centred moving mean (window up to ~4% of the points), narrowed symmetrically
    at the ends so that the first and last points stay where they are."""
    half, n = len(values) // 50, len(values)
    spans = (min(half, i, n - 1 - i) for i in range(n))
    return [sum(values[i - h: i + h + 1]) / (2 * h + 1) for i, h in zip(range(n), spans)]


def plot_loss(runs: list[Run], colors: dict[str, str], path: Path) -> None:
    """Training (raw faint, smoothed solid) and validation (dashed, dots) loss against tokens;
    the right panel zooms into the last part, where the runs differ."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    end = max(r.train[-1]["tokens"] for r in runs)
    start = (1 - ZOOM_FRACTION) * end
    in_zoom: list[float] = []
    for run in runs:
        color = colors[run.name]
        x = [r["tokens"] for r in run.train]
        raw = [r["loss"] for r in run.train]
        smooth = _smooth(raw)
        vx = [r["tokens"] for r in run.evals]
        vy = [r["val_loss"] for r in run.evals]
        for ax in (full, zoom):
            ax.plot(x, raw, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(x, smooth, color=color, linewidth=1.8)
            ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.2)
        in_zoom += [y for t, y in zip(x + vx, smooth + vy) if t >= start and math.isfinite(y)]
    if in_zoom:
        low, high = min(in_zoom), max(in_zoom)
        pad = max(high - low, 1e-3) * 0.15
        zoom.set_ylim(low - pad, high + pad)
    zoom.set_xlim(start, end * 1.01)
    full.axvspan(start, end, color="#000000", alpha=0.05, linewidth=0)
    for ax, title in ((full, "whole run"), (zoom, f"last {ZOOM_FRACTION:.0%} of tokens (zoomed)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    # Below the axes, so that no legend hides a curve, in two rows, so that the grey
    # line-style keys are not read as the dark baseline; the figure grows to hold them.
    ncol = min(len(runs), 6)
    run_rows = -(-len(runs) // ncol)
    row_in, height = 0.3, fig.get_figheight()
    legend_in = row_in * (run_rows + 1) + 0.1
    fig.set_figheight(height + legend_in)
    total = height + legend_in
    fig.legend(handles=[Line2D([], [], color=colors[r.name], linewidth=2.5, label=r.name)
                        for r in runs], loc="lower center", ncol=ncol, frameon=False,
               bbox_to_anchor=(0.5, 0))
    fig.legend(handles=[
        Line2D([], [], color="0.45", linewidth=1.8, label="train loss (smoothed)"),
        Line2D([], [], color="0.45", alpha=0.35, linewidth=1.5, label="train loss (raw)"),
        Line2D([], [], color="0.45", linestyle="--", marker="o", markersize=4,
               label="validation loss"),
    ], loc="lower center", ncol=3, frameon=False, fontsize=8, handlelength=3,
        bbox_to_anchor=(0.5, row_in * run_rows / total + 0.01))
    fig.tight_layout(rect=(0, legend_in / total, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_throughput(runs: list[Run], stats: dict[str, RunStats], colors: dict[str, str],
                    path: Path) -> None:
    """Horizontal bars (room for long names) of throughput and MFU per run, values written on."""
    import matplotlib.pyplot as plt

    names = [r.name for r in runs]
    hardware = {f"{r.info['world_size']} × {r.info['device']}" for r in runs}
    labels = names if len(hardware) == 1 else [
        f"{r.name}\n{r.info['world_size']} × {r.info['device']}" for r in runs
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.55 * len(runs)), sharey=True)
    for ax, values, xlabel, fmt in (
        (axes[0], [stats[n].tokens_per_s for n in names], "throughput (tokens/s)", "{:,.0f}"),
        (axes[1], [100 * stats[n].mfu for n in names], "model FLOPs utilisation (%)", "{:.2f}%"),
    ):
        bars = ax.barh(range(len(names)), values, color=[colors[n] for n in names])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8, padding=3)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(values) * 1.2 or 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), labels)
    axes[0].invert_yaxis()
    subtitle = f" on {hardware.pop()}" if len(hardware) == 1 else ""
    fig.suptitle(f"Training speed{subtitle}: mean over logged intervals after the first",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


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
    runs = load_runs(run_dirs)
    stats = {r.name: run_stats(r) for r in runs}
    colors = run_colors([r.name for r in runs])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"Loss": "loss.png", "Throughput": "throughput.png",
               "Per-layer parameter profiles": "profiles.png"}
    with _atomic(out / figures["Loss"]) as tmp:
        plot_loss(runs, colors, tmp)
    with _atomic(out / figures["Throughput"]) as tmp:
        plot_throughput(runs, stats, colors, tmp)
    with _atomic(out / figures["Per-layer parameter profiles"]) as tmp:
        plot_profiles([describe_json(r.name, r.config, int(r.info["tp"])) for r in runs],
                      str(tmp), colors=colors, ncols=3)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = out / "report.md"
    with _atomic(report) as tmp:
        tmp.write_text(render_markdown(runs, stats, figures, date))
    return report


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lws_megatron.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="where report.md and the figures go (created if missing)")
    args = parser.parse_args(argv)
    print(write_report(args.run_dirs, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())

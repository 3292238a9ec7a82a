"""`python -m lws_megatron.report RUN_DIR... --output DIR`: compare training runs.

Writes `DIR/report.md` with a table and a few computed findings, and the figures
`loss.png`, `throughput.png` and `profiles.png`. Every number is read from the runs'
`metrics.jsonl` and `run_info.json`, so the report cannot drift from the runs. Runs that share
a name and a config apart from `train.seed` (a seed sweep, `launch/sweep.py`) are one profile:
one row with the mean and sample standard deviation of the final losses over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from lws_megatron.cli import HelpFormatter
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
INFO_KEYS = (
    "total_params",
    "flops_per_token",
    "tokenizer_sha256",
    "valid_data_sha256",
    "tp",
    "world_size",
    "device",
)
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
class Profile:
    """The runs of one experiment that differ only in `train.seed`; a run without repeats is a
    profile of one. One row in the table, one colour in the figures."""

    name: str
    runs: tuple[Run, ...]

    @property
    def seeded(self) -> bool:
        return len(self.runs) > 1

    def label(self, run: Run) -> str:
        """One run of the profile, as a sentence names it."""
        return f"{self.name} seed {run.config.train.seed}" if self.seeded else self.name


@dataclass(frozen=True)
class Spread:
    """A number over a profile's seeds: the mean and the sample standard deviation (None for a
    single seed, since one run says nothing about the spread)."""

    mean: float
    std: float | None

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        """A seed that diverged (a loss that is not finite) leaves nothing to average."""
        n = len(values)
        if not all(map(math.isfinite, values)):
            return cls(math.nan, None if n == 1 else math.nan)
        mean = math.fsum(values) / n
        if n == 1:
            return cls(mean, None)
        return cls(mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)))


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
    tokens_per_s_range: tuple[float, float] = (math.nan, math.nan)
    mfu_range: tuple[float, float] = (math.nan, math.nan)
    busiest_load: float | None = None  # the host's highest 1-minute load average logged


@dataclass(frozen=True)
class ProfileStats:
    """The table's numbers for one profile: the final losses over its seeds, the rest means;
    `runs` holds each seed's own numbers, in the order of `Profile.runs`."""

    runs: tuple[RunStats, ...]
    params: int
    flops_per_token: int
    final_loss: Spread
    final_val_loss: Spread | None
    final_val_ppl: float | None
    tokens_per_s: float
    mfu: float
    wall_time_s: float

    @property
    def tokens_per_s_range(self) -> tuple[float, float]:
        """The slowest and fastest logged interval after the first, over every seed."""
        return _range([s.tokens_per_s_range for s in self.runs])

    @property
    def mfu_range(self) -> tuple[float, float]:
        return _range([s.mfu_range for s in self.runs])


def _range(ranges: list[tuple[float, float]]) -> tuple[float, float]:
    return min(low for low, _ in ranges), max(high for _, high in ranges)


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
    bad = [
        f"{k}={record[k]!r}"
        for k in keys
        if isinstance(record[k], bool) or not isinstance(record[k], (int, float))
    ]
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
    resolved = [Path(d).resolve() for d in run_dirs]
    repeated = sorted({str(d) for d, r in zip(run_dirs, resolved) if resolved.count(r) > 1})
    if repeated:
        raise UserError(f"run directory given twice: {', '.join(repeated)}; give each once")
    return [load_run(d) for d in run_dirs]


def _experiment(config: Config) -> str:
    """The config without where the run lives, how it checkpoints and its seed: runs that
    agree on it differ only by chance."""
    tree = config.to_dict()
    del tree["run"], tree["checkpoint"], tree["train"]["seed"]
    return json.dumps(tree, sort_keys=True)


def group_runs(runs: list[Run]) -> list[Profile]:
    """Profiles in the order of their first run. Runs of one name and experiment with distinct
    seeds are one profile; any other runs sharing a name are told apart by their directory."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.name, _experiment(run.config)), []).append(run)
    members: list[list[Run]] = []
    for group in groups.values():
        seeds = [r.config.train.seed for r in group]
        members += [group] if len(set(seeds)) == len(seeds) else [[r] for r in group]
    names = [group[0].name for group in members]
    profiles = []
    for group in members:
        name = group[0].name
        if names.count(name) > 1:
            name += f" ({os.path.commonpath([str(r.path) for r in group])})"
        profiles.append(Profile(name, tuple(sorted(group, key=lambda r: r.config.train.seed))))
    return profiles


# ---------------------------------------------------------------- aggregating (pure)


def run_stats(run: Run) -> RunStats:
    """Final losses from the last records; speed is the mean without the first (warm-up)
    interval."""
    last, steady = run.train[-1], run.train[1:] or run.train
    final_eval = run.evals[-1] if run.evals else None
    speeds, mfus = [r["tokens_per_s"] for r in steady], [r["mfu"] for r in steady]
    loads = [r["load_avg"] for r in steady if isinstance(r.get("load_avg"), (int, float))]
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
        tokens_per_s_range=(min(speeds), max(speeds)),
        mfu_range=(min(mfus), max(mfus)),
        busiest_load=max(loads) if loads else None,
    )


def profile_stats(profile: Profile) -> ProfileStats:
    """A validation loss only when every seed was evaluated, so that the mean is over all."""
    runs = tuple(run_stats(r) for r in profile.runs)
    val = [s.final_val_loss for s in runs]
    ppl = [s.final_val_ppl for s in runs]
    evaluated = None not in val
    return ProfileStats(
        runs=runs,
        params=runs[0].params,
        flops_per_token=runs[0].flops_per_token,
        final_loss=Spread.of([s.final_loss for s in runs]),
        final_val_loss=Spread.of(val) if evaluated else None,
        final_val_ppl=math.fsum(ppl) / len(ppl) if evaluated else None,
        tokens_per_s=math.fsum(s.tokens_per_s for s in runs) / len(runs),
        mfu=math.fsum(s.mfu for s in runs) / len(runs),
        wall_time_s=math.fsum(s.wall_time_s for s in runs) / len(runs),
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


def baseline_profile(profiles: list[Profile]) -> Profile | None:
    """The single profile named after the baseline; none when absent or ambiguous."""
    found = [p for p in profiles if profile_key(p.name) == "baseline"]
    return found[0] if len(found) == 1 else None


def comparability_warnings(profiles: list[Profile]) -> list[str]:
    """A warning per fingerprint (tokenizer, validation data) on which the runs disagree."""
    warnings = []
    for key, what, consequence in (
        ("tokenizer_sha256", "tokenizers", "Their losses and perplexities are not comparable"),
        ("valid_data_sha256", "validation data", "Their validation losses are not comparable"),
    ):
        groups: dict[str, list[str]] = {}
        for profile in profiles:
            for run in profile.runs:
                groups.setdefault(str(run.info[key]), []).append(profile.label(run))
        if len(groups) > 1:
            listing = "; ".join(
                f"{', '.join(dict.fromkeys(names))} ({key} {digest[:12] or 'empty'})"
                for digest, names in groups.items()
            )
            warnings.append(f"The runs use different {what}: {listing}. {consequence}.")
    return warnings


def _seeds_note(profile: Profile) -> str:
    return f" (mean of {len(profile.runs)} seeds)" if profile.seeded else ""


def baseline_delta(
    profile: Profile, base: Profile, stats: dict[str, ProfileStats], key: str
) -> str:
    """The final loss of `profile` minus the baseline's. Over seeds, paired by seed (both saw
    the same data order), so that its spread is that of the differences themselves."""
    ref = getattr(stats[base.name], key).mean
    value = getattr(stats[profile.name], key).mean
    if not (profile.seeded or base.seeded):
        return f"{profile.name} {value - ref:+.4f} ({(value - ref) / ref:+.2%})"
    per_seed = [
        {r.config.train.seed: getattr(s, key) for r, s in zip(p.runs, stats[p.name].runs)}
        for p in (profile, base)
    ]
    shared = [seed for seed in per_seed[0] if seed in per_seed[1]]
    if len(shared) < 2:
        return (
            f"{profile.name} {value - ref:+.4f} ({(value - ref) / ref:+.2%}; a difference "
            f"of means, as fewer than two seeds are shared with {base.name})"
        )
    diff = Spread.of([per_seed[0][seed] - per_seed[1][seed] for seed in shared])
    return (
        f"{profile.name} {diff.mean:+.4f} ± {diff.std:.4f} ({diff.mean / ref:+.2%}; "
        f"paired over seeds {', '.join(map(str, shared))})"
    )


def findings(profiles: list[Profile], stats: dict[str, ProfileStats], warned: bool) -> list[str]:
    """A few sentences computed from the numbers: who is best, by how much, and caveats."""
    lines = []
    unevaluated = [p.name for p in profiles if stats[p.name].final_val_loss is None]
    key, label = ("final_loss", "training") if unevaluated else ("final_val_loss", "validation")
    if unevaluated and len(unevaluated) < len(profiles):
        lines.append(
            f"No evaluation logged for {', '.join(unevaluated)}, so runs are compared "
            "on training loss."
        )
    by_name = {p.name: p for p in profiles}
    # A profile whose last logged loss is not finite (diverged) is left out of the ranking.
    losses = {p.name: v for p in profiles if math.isfinite(v := getattr(stats[p.name], key).mean)}
    if losses:
        best = min(losses, key=losses.get)
        caveat = " (but see the warning above: not all runs are comparable)" if warned else ""
        lines.append(
            f"Lowest final {label} loss: **{best}**, {losses[best]:.4f} nats"
            f"{_seeds_note(by_name[best])}{caveat}."
        )
    spreads = [
        f"{p.name} {getattr(stats[p.name], key).std:.4f} ({len(p.runs)} seeds)"
        for p in profiles
        if p.seeded and p.name in losses
    ]
    if spreads:
        lines.append(
            f"Seed-to-seed standard deviation of the final {label} loss: "
            f"{', '.join(spreads)}; a difference of that size between two profiles' "
            "means can come from the seeds alone."
        )
    base = baseline_profile(profiles)
    if base is not None and base.name in losses and len(losses) > 1:
        deltas = ", ".join(
            baseline_delta(by_name[name], base, stats, key)
            for name in sorted(losses, key=losses.get)
            if name != base.name
        )
        over = f", mean of {len(base.runs)} seeds" if base.seeded else ""
        spread = (
            "; ± is the sample standard deviation of the per-seed differences"
            if any(p.seeded for p in profiles)
            else ""
        )
        lines.append(
            f"Final {label} loss relative to {base.name} ({losses[base.name]:.4f} nats"
            f"{over}): {deltas}{spread}."
        )
    return lines + _run_notes(profiles, stats)


# ---------------------------------------------------------------- formatting (pure)


def _run_notes(profiles: list[Profile], stats: dict[str, ProfileStats]) -> list[str]:
    """Throughput, how far each run got, and which runs have not finished."""
    lines = []
    fastest = max(stats, key=lambda n: stats[n].tokens_per_s)
    slowest = min(stats, key=lambda n: stats[n].tokens_per_s)
    if fastest != slowest:
        lines.append(
            f"Highest throughput: {fastest}, {stats[fastest].tokens_per_s:,.0f} tokens/s "
            f"({stats[fastest].mfu:.2%} MFU); lowest: {slowest}, "
            f"{stats[slowest].tokens_per_s:,.0f} tokens/s ({stats[slowest].mfu:.2%} MFU)."
        )
    tokens = {p.label(r): s.tokens for p in profiles for r, s in zip(p.runs, stats[p.name].runs)}
    if len(set(tokens.values())) > 1:
        ends = ", ".join(f"{n} {_si(t)}" for n, t in tokens.items())
        lines.append(
            f"The runs stopped at different token counts ({ends}): their final losses "
            "are taken at different points of training."
        )
    else:
        lines.append(f"Every run consumed {_si(next(iter(tokens.values())))} training tokens.")
    unfinished = [p.label(r) for p in profiles for r in p.runs if not r.finished]
    if unfinished:
        lines.append(
            f"No summary.json for {', '.join(unfinished)}: still running or stopped "
            "early; the numbers are those of the last logged step."
        )
    return lines


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


def _span(bounds: tuple[float, float], fmt: str) -> str:
    return f"{bounds[0]:{fmt}}-{bounds[1]:{fmt}}"


def _spread(value: Spread | None, fmt: str) -> str:
    if value is None or value.std is None or not math.isfinite(value.mean):
        return _num(None if value is None else value.mean, fmt)
    return f"{value.mean:{fmt}} ± {value.std:{fmt}}"


TABLE_COLUMNS = (
    "run",
    "params (M)",
    "GFLOPs/token",
    "final train loss",
    "final val loss",
    "val ppl",
    "tokens/s",
    "MFU",
    "wall time",
)


def render_table(profiles: list[Profile], stats: dict[str, ProfileStats]) -> str:
    """One row per profile; a `seeds` column only when some profile has several."""
    seeded = any(p.seeded for p in profiles)
    columns = TABLE_COLUMNS[:1] + ("seeds",) * seeded + TABLE_COLUMNS[1:]
    rows = [
        (
            p.name,
            *[str(len(p.runs))] * seeded,
            f"{s.params / 1e6:.2f}",
            f"{s.flops_per_token / 1e9:.4g}",
            _spread(s.final_loss, ".4f"),
            _spread(s.final_val_loss, ".4f"),
            _num(s.final_val_ppl, ".2f"),
            f"{s.tokens_per_s:,.0f} ({_span(s.tokens_per_s_range, ',.0f')})",
            f"{s.mfu:.2%} ({_span(s.mfu_range, '.1%')})",
            _duration(s.wall_time_s),
        )
        for p, s in ((p, stats[p.name]) for p in profiles)
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join([":--"] + ["--:"] * (len(columns) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_notes(profiles: list[Profile], stats: dict[str, ProfileStats]) -> list[str]:
    """What the MFU is measured against, and which runs shared their machine (a load average
    above the host's cores): their speed includes other work's."""
    sources = {
        str(r.info.get("peak_flops_source", "not recorded")) for p in profiles for r in p.runs
    }
    lines = [f"MFU is measured against: {'; '.join(sorted(sources))}.", ""]
    if len(sources) > 1:
        lines += [
            "> **Warning:** the runs' MFU is measured against different peaks; compare "
            "their tokens/s, not their MFU.",
            "",
        ]
    shared = []
    for p in profiles:
        for run, s in zip(p.runs, stats[p.name].runs):
            cpus = run.info.get("host_cpus")
            if s.busiest_load is not None and cpus and s.busiest_load > cpus + 1:
                shared.append(f"{p.label(run)} (load {s.busiest_load:.1f} on {cpus} cores)")
    if shared:
        lines += [
            f"> **Note:** the machine was shared during {', '.join(shared)}: more work was "
            "waiting than it has cores, so those runs' tokens/s and MFU include other work's "
            "time; compare throughput from runs on an otherwise idle machine.",
            "",
        ]
    return lines


def render_markdown(
    profiles: list[Profile], stats: dict[str, ProfileStats], figures: dict[str, str], date: str
) -> str:
    warnings = comparability_warnings(profiles)
    runs = [r for p in profiles for r in p.runs]
    parts = [
        "# LWS training report",
        "",
        f"{date}. Read from {len(runs)} run directories: "
        + ", ".join(f"`{r.path}`" for r in runs)
        + ".",
        "",
        "Final losses are in nats per token at the last logged step (validation: last evaluation); "
        "tokens/s and MFU are means over the logged intervals after the first, with the "
        "slowest and fastest of those intervals in brackets; "
        "wall time is the last logged `time_s`.",
        "",
        *throughput_notes(profiles, stats),
    ]
    if any(p.seeded for p in profiles):
        parts += [
            "Runs that share a name and a config apart from `train.seed` are the seeds of "
            "one profile: its final losses are the mean ± sample standard deviation over "
            "the seeds, its other columns their means.",
            "",
        ]
    parts += [f"> **Warning:** {w}\n" for w in warnings]
    parts += [render_table(profiles, stats), "", "## Findings", ""]
    parts += [f"- {line}" for line in findings(profiles, stats, bool(warnings))]
    for title, file in figures.items():
        parts += ["", f"## {title}", "", f"![{title}]({file})"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plotting (the edge)


def _smooth(values: list[float]) -> list[float]:
    """A light centred moving mean (window up to ~4% of the points), narrowed symmetrically
    at the ends so that the first and last points stay where they are."""
    half, n = len(values) // 50, len(values)
    spans = (min(half, i, n - 1 - i) for i in range(n))
    return [sum(values[i - h : i + h + 1]) / (2 * h + 1) for i, h in zip(range(n), spans)]


def _seed_mean(curves: list[list[tuple[int, float, float]]]) -> tuple[list[float], list[float]]:
    """The mean over seeds of (step, tokens, value) curves, at the steps every seed logged."""
    shared = set.intersection(*({step for step, _, _ in curve} for curve in curves))
    by_step = [{step: (t, v) for step, t, v in curve} for curve in curves]
    steps = sorted(shared)
    return (
        [by_step[0][step][0] for step in steps],
        [math.fsum(c[step][1] for c in by_step) / len(by_step) for step in steps],
    )


def plot_loss(profiles: list[Profile], colors: dict[str, str], path: Path) -> None:
    """Training (raw faint, smoothed solid) and validation (dashed, dots) loss against tokens;
    the right panel zooms into the last part, where the runs differ. A profile over seeds
    draws each seed's smoothed loss thin and their mean solid, in its one colour."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    end = max(r.train[-1]["tokens"] for p in profiles for r in p.runs)
    start = (1 - ZOOM_FRACTION) * end
    in_zoom = _draw_losses(profiles, colors, (full, zoom), start)
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
    legend_in, total = _loss_legends(fig, profiles, colors)
    fig.tight_layout(rect=(0, legend_in / total, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _draw_losses(profiles: list[Profile], colors: dict[str, str], axes, start: float) -> list:
    """Each profile's curves on both axes; the loss values inside the zoomed window."""
    full, zoom = axes
    in_zoom: list[float] = []
    for profile in profiles:
        color = colors[profile.name]
        curves = [
            [
                (r["step"], r["tokens"], y)
                for r, y in zip(run.train, _smooth([r["loss"] for r in run.train]))
            ]
            for run in profile.runs
        ]
        x, smooth = _seed_mean(curves)
        vx, vy = _seed_mean(
            [[(r["step"], r["tokens"], r["val_loss"]) for r in run.evals] for run in profile.runs]
        )
        for ax in (full, zoom):
            if profile.seeded:
                for curve in curves:
                    ax.plot(
                        [t for _, t, _ in curve],
                        [y for _, _, y in curve],
                        color=color,
                        alpha=0.45,
                        linewidth=0.7,
                    )
            else:
                ax.plot(
                    x,
                    [r["loss"] for r in profile.runs[0].train],
                    color=color,
                    alpha=0.2,
                    linewidth=0.8,
                )
            ax.plot(x, smooth, color=color, linewidth=1.8)
            ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.2)
        in_zoom += [y for curve in curves for _, t, y in curve if t >= start and math.isfinite(y)]
        in_zoom += [y for t, y in zip(vx, vy) if t >= start and math.isfinite(y)]
    return in_zoom


def _loss_legends(fig, profiles: list[Profile], colors: dict[str, str]) -> tuple[float, float]:
    """The profiles' colours and the line styles, below the axes; (legend height, figure
    height) in inches."""
    from matplotlib.lines import Line2D

    styles = _style_keys(profiles)
    # Below the axes, so that no legend hides a curve, in two rows, so that the grey
    # line-style keys are not read as the dark baseline; the figure grows to hold them.
    ncol = min(len(profiles), 6)
    run_rows = -(-len(profiles) // ncol)
    row_in, height = 0.3, fig.get_figheight()
    legend_in = row_in * (run_rows + 1) + 0.1
    fig.set_figheight(height + legend_in)
    total = height + legend_in
    fig.legend(
        handles=[
            Line2D(
                [],
                [],
                color=colors[p.name],
                linewidth=2.5,
                label=p.name + f" ({len(p.runs)} seeds)" * p.seeded,
            )
            for p in profiles
        ],
        loc="lower center",
        ncol=ncol,
        frameon=False,
        bbox_to_anchor=(0.5, 0),
    )
    fig.legend(
        handles=styles,
        loc="lower center",
        ncol=len(styles),
        frameon=False,
        fontsize=8,
        handlelength=3,
        bbox_to_anchor=(0.5, row_in * run_rows / total + 0.01),
    )
    return legend_in, total


def _style_keys(profiles: list[Profile]) -> list:
    """Grey keys for the line styles the loss figure uses (seeded profiles draw more)."""
    from matplotlib.lines import Line2D

    seeded = any(p.seeded for p in profiles)
    single = not all(p.seeded for p in profiles)
    over_seeds = ", mean over seeds" if seeded else ""
    styles = [
        Line2D([], [], color="0.45", linewidth=1.8, label=f"train loss (smoothed{over_seeds})")
    ]
    styles += [
        Line2D([], [], color="0.45", alpha=0.35, linewidth=1.5, label="train loss (raw)")
    ] * single
    styles += [
        Line2D(
            [], [], color="0.45", alpha=0.6, linewidth=0.7, label="train loss, each seed (smoothed)"
        )
    ] * seeded
    styles += [
        Line2D(
            [],
            [],
            color="0.45",
            linestyle="--",
            marker="o",
            markersize=4,
            label="validation loss" + " (mean over seeds)" * seeded,
        )
    ]
    return styles


def plot_throughput(
    profiles: list[Profile], stats: dict[str, ProfileStats], colors: dict[str, str], path: Path
) -> None:
    """Horizontal bars (room for long names) of throughput and MFU per profile (the mean over
    its seeds), values written on."""
    import matplotlib.pyplot as plt

    names = [p.name for p in profiles]
    where = [{f"{r.info['world_size']} × {r.info['device']}" for r in p.runs} for p in profiles]
    hardware = set.union(*where)
    labels = (
        names
        if len(hardware) == 1
        else [f"{p.name}\n{' / '.join(sorted(w))}" for p, w in zip(profiles, where)]
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.55 * len(profiles)), sharey=True)
    for ax, values, ranges, xlabel, fmt in (
        (
            axes[0],
            [stats[n].tokens_per_s for n in names],
            [stats[n].tokens_per_s_range for n in names],
            "throughput (tokens/s)",
            "{:,.0f}",
        ),
        (
            axes[1],
            [100 * stats[n].mfu for n in names],
            [tuple(100 * v for v in stats[n].mfu_range) for n in names],
            "model FLOPs utilisation (%)",
            "{:.2f}%",
        ),
    ):
        spread = [
            [v - low for v, (low, _) in zip(values, ranges)],
            [high - v for v, (_, high) in zip(values, ranges)],
        ]
        bars = ax.barh(
            range(len(names)), values, xerr=spread, capsize=3, color=[colors[n] for n in names]
        )
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8, padding=3)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(high for _, high in ranges) * 1.25 or 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), labels)
    axes[0].invert_yaxis()
    subtitle = f" on {hardware.pop()}" if len(hardware) == 1 else ""
    seeds = ", and over seeds" if any(p.seeded for p in profiles) else ""
    fig.suptitle(
        f"Training speed{subtitle}: mean over logged intervals after the first{seeds}, "
        "bars from the slowest to the fastest interval",
        fontsize=10,
    )
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


if __name__ == "__main__":
    sys.exit(main())

"""report.md: the table, the notes on how throughput was measured, the findings, the figures."""

from __future__ import annotations

import math

from lws_megatron.report.findings import comparability_warnings, findings
from lws_megatron.report.runs import Profile
from lws_megatron.report.stats import ProfileStats, Spread


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

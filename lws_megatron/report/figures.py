"""The report's figures (matplotlib, imported when drawing): loss curves and training speed."""

from __future__ import annotations

import math
from pathlib import Path

from lws_megatron.report.runs import Profile
from lws_megatron.report.stats import ProfileStats

ZOOM_FRACTION = 0.3  # the zoomed loss panel shows the last 30% of tokens

DPI = 150


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

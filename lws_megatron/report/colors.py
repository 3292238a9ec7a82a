"""Which known profile a run name refers to, and the colour it keeps in every figure."""

from __future__ import annotations

import re

# The paper's profiles keep their colour in every report; baseline is the dark reference.
PROFILE_COLORS = {
    "baseline": "#333333",
    "vanilla": "#1f77b4",
    "framed": "#2ca02c",
    "reverse": "#d62728",
    "crown": "#9467bd",
}

OTHER_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")


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

"""Budget matching: rescale a profile's knots, keeping its shape, to hit a parameter or FLOP target.

Interior knots are scaled; frame multipliers stay (they are the reference model's full size).
Rounding makes the budget a step function of the scale, so a single common factor cannot
always land within tolerance (a constant profile moves every layer at once): the search then
scales FFN and attention knots by separate factors, preferring factors close to each other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable

from lws_megatron import shapes
from lws_megatron.config import LWSConfig, ModelConfig
from lws_megatron.errors import UserError

METRICS = ("params", "flops")
_KNOT_DECIMALS = 4
_SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}


@dataclass(frozen=True)
class Match:
    profile: LWSConfig
    achieved: int
    target: int

    @property
    def error(self) -> float:
        return self.achieved / self.target - 1


def parse_amount(text: str) -> int:
    """'180M' -> 180_000_000; also '1.1B', '9e8', '900000000'."""
    number = r"(?:\d+(?:\.\d*)?|\.\d+)(?:E[+-]?\d+)?"
    m = re.fullmatch(rf"\s*({number})\s*([KMGBT]?)\s*", text.upper())
    if not m:
        raise UserError(f"amount {text!r}: write a number with an optional K/M/B suffix, e.g. 180M")
    amount = float(m.group(1)) * _SUFFIXES[m.group(2)]
    if not 1 <= amount < 1e30:
        raise UserError(
            f"amount {text!r} must lie between 1 and 1e30; give the budget to match, e.g. 180M"
        )
    return int(amount)


def measure(profile: LWSConfig, dims: ModelConfig, metric: str, tp: int = 1) -> int:
    summary = shapes.summarize(profile, dims, tp)
    return summary.total_params if metric == "params" else summary.flops_per_token


def scaled(profile: LWSConfig, ffn_scale: float, attn_scale: float) -> LWSConfig:
    return replace(
        profile,
        ffn_knots=tuple(round(k * ffn_scale, _KNOT_DECIMALS) for k in profile.ffn_knots),
        attn_knots=tuple(round(k * attn_scale, _KNOT_DECIMALS) for k in profile.attn_knots),
    )


def match_budget(
    profile: LWSConfig,
    dims: ModelConfig,
    target: int,
    metric: str = "params",
    tp: int = 1,
    tolerance: float = 0.005,
) -> Match:
    """The rescaled profile closest to `target`; UserError when none is within `tolerance`."""
    if metric not in METRICS:
        raise UserError(f"budget metric {metric!r}: choose one of {', '.join(METRICS)}")

    def value(fs: float, as_: float) -> int | None:
        try:
            return measure(scaled(profile, fs, as_), dims, metric, tp)
        except UserError:
            return None

    common = _closest(lambda s: value(s, s), target)
    candidates = [] if common is None else [(common[0], common[1], common[1])]
    if common is None or abs(common[0] / target - 1) > tolerance:
        centre = common[1] if common else 1.0
        for i in range(-60, 61):
            attn_scale = centre * 2 ** (i / 60)
            found = _closest(lambda s: value(s, attn_scale), target)
            if found:
                candidates.append((found[0], found[1], attn_scale))
    if not candidates:
        raise UserError(f"no rescaling of this profile reaches {target:,} {metric}")

    def rank(c: tuple[int, float, float]) -> tuple[float, float]:
        return (round(abs(c[0] / target - 1), 4), abs(math.log(c[1] / c[2])))

    achieved, ffn_scale, attn_scale = min(candidates, key=rank)
    result = Match(scaled(profile, ffn_scale, attn_scale), achieved, target)
    if abs(result.error) > tolerance:
        raise UserError(
            f"the closest this profile gets to {target:,} {metric} is {achieved:,} "
            f"({result.error:+.2%}); rounding steps are too coarse here: change "
            "model.num_layers or lws.ffn_multiple"
        )
    return result


def _closest(evaluate: Callable[[float], int | None], target: int) -> tuple[int, float] | None:
    """Bisect a scale for a budget that grows with it; return (value, scale) nearest the target."""
    lo, hi = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        v = evaluate(mid)
        if v is not None and v >= target:
            hi = mid
        else:
            lo = mid
    sides = [(evaluate(s), s) for s in (lo, hi)]
    sides = [(v, s) for v, s in sides if v is not None]
    return min(sides, key=lambda vs: abs(vs[0] - target)) if sides else None

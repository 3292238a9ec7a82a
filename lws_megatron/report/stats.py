"""The report's numbers per run and per profile (means and spreads over seeds)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lws_megatron.report.runs import Profile, Run


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

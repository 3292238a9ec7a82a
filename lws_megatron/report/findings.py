"""The report's sentences computed from the numbers: who is best, by how much, and caveats."""

from __future__ import annotations

import math

from lws_megatron.report.colors import profile_key
from lws_megatron.report.runs import Profile
from lws_megatron.report.stats import ProfileStats, Spread


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

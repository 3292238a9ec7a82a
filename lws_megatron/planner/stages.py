"""Pipeline plans for a config: the optimal split, Megatron's even split, and their layouts.

A layout is Megatron-Core's `pipeline_model_parallel_layout`: one entry per virtual stage,
separated by `|`, entry v * pp + r belonging to virtual stage v of rank r; `E` the embedding,
`t` a transformer layer (`t*5` five of them), `L` the output head and loss.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from lws_megatron.config import Config
from lws_megatron.errors import UserError
from lws_megatron.planner.costs import Timings, cost_model, micro_batches_in_flight
from lws_megatron.planner.memory import precision_named
from lws_megatron.planner.partition import INF, Tables, even_bounds, rank_totals, solve, tables
from lws_megatron.planner.recompute import auto_tables, with_recompute

_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


@dataclass(frozen=True)
class Stage:
    """One pipeline rank: its layers per virtual stage, its compute and its memory."""

    rank: int
    chunks: tuple[tuple[int, ...], ...]
    embedding: bool
    output: bool
    cost: float
    memory_bytes: int
    recomputed: tuple[int, ...] = ()  # the layers `--recompute auto` recomputes here

    @property
    def layers(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk]


@dataclass(frozen=True)
class Split:
    """One way to cut the layers: chunk boundaries, per-rank stages, Megatron's layout string."""

    bounds: tuple[int, ...]
    stages: tuple[Stage, ...]
    layout: str

    @property
    def imbalance(self) -> float:
        return imbalance([s.cost for s in self.stages])

    def to_json(self) -> dict:
        total = sum(s.cost for s in self.stages)
        return {
            "layout": self.layout,
            "stages": [
                {
                    "rank": s.rank,
                    "layers": s.layers,
                    "chunks": [list(c) for c in s.chunks],
                    "embedding": s.embedding,
                    "output": s.output,
                    "cost": s.cost,
                    "share": s.cost / total,
                    "memory_bytes": s.memory_bytes,
                    "recomputed": list(s.recomputed),
                }
                for s in self.stages
            ],
            "imbalance": self.imbalance,
        }


@dataclass(frozen=True)
class Plan:
    """The planned split beside Megatron's even split, and the settings they assume."""

    planned: Split
    even: Split
    even_is_megatron_default: bool
    proven: bool
    pp: int
    vpp: int
    tp: int
    dp: int
    zero: int
    micro_batches: int
    precision: str
    recompute: str
    device_memory: int | None
    unit: str
    auto_recompute: bool = False  # `recompute` was chosen per stage (Stage.recomputed)

    @property
    def recomputed(self) -> tuple[int, ...]:
        """Every layer the planned split recomputes under `--recompute auto`."""
        return tuple(sorted(i for s in self.planned.stages for i in s.recomputed))

    def to_json(self) -> dict:
        return {
            "pp": self.pp,
            "vpp": self.vpp,
            "tp": self.tp,
            "dp": self.dp,
            "zero": self.zero,
            "micro_batches": self.micro_batches,
            "precision": self.precision,
            "recompute": self.recompute,
            **({"recompute_layers": list(self.recomputed)} if self.auto_recompute else {}),
            "device_memory": self.device_memory,
            "cost_unit": self.unit,
            "proven_optimal": self.proven,
            **self.planned.to_json(),
            "even_split_imbalance": self.even.imbalance,
            "even_split": {
                **self.even.to_json(),
                "megatron_default": self.even_is_megatron_default,
            },
        }


def imbalance(loads: list[float]) -> float:
    """The slowest rank's load over the mean: the pipeline runs at the slowest rank's pace."""
    return max(loads) * len(loads) / sum(loads)


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30; also plain bytes, K/M/T and KiB/MiB/TiB."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?\d+)?)\s*([KMGT]I?)?B?\s*", text.upper())
    if not m:
        raise UserError(
            f"memory size {text!r}: write a number with a unit, e.g. 80GB, 80GiB or 512MiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan(
    config: Config,
    *,
    pp: int | None = None,
    vpp: int = 1,
    dp: int = 1,
    device_memory: int | None = None,
    precision: str | None = None,
    timings: Timings | None = None,
    device: str = "cuda",
) -> Plan:
    """Plan `config`'s pipeline at PP ranks (default parallel.pp), VPP virtual stages each,
    with its recomputation (parallel.recompute, parallel.recompute_layers).

    Precision defaults to train.precision, "auto" accounted as a run on `device` resolves it;
    the activations counted are those `device`'s kernels keep (cuda | cpu).
    Raises UserError for sizes that cannot be split and for a memory limit no split meets.
    """
    pp = config.parallel.pp if pp is None else pp
    micro_batches = _check(config, pp, vpp, dp)
    accounting = precision_named(precision or config.train.precision, device)
    model = cost_model(config, pp=pp, dp=dp, precision=accounting, timings=timings, device=device)
    t = tables(model, pp, micro_batches_in_flight(pp, vpp, micro_batches))
    solution = solve(t, device_memory)
    if solution is None:
        raise _memory_error(t, device_memory, vpp)
    return _plan(
        config, t, solution, vpp, dp, micro_batches, accounting.name, device_memory, model.unit
    )


def plan_recompute(
    config: Config,
    *,
    device_memory: int,
    pp: int | None = None,
    dp: int = 1,
    precision: str | None = None,
    timings: Timings | None = None,
    device: str = "cuda",
) -> Plan:
    """`plan --recompute auto`: the fastest split within `device_memory` whose stages each
    recompute (fully) the fewest of their layers that make them fit, widest first."""
    pp = config.parallel.pp if pp is None else pp
    micro_batches = _check(config, pp, 1, dp)
    accounting = precision_named(precision or config.train.precision, device)
    models = [
        cost_model(
            with_recompute(config, kind),
            pp=pp,
            dp=dp,
            precision=accounting,
            timings=timings,
            device=device,
        )
        for kind in ("none", "full")
    ]
    in_flight = micro_batches_in_flight(pp, 1, micro_batches)
    t, chosen = auto_tables(config, *models, pp, in_flight, device_memory)
    solution = solve(t, device_memory)
    if solution is None:
        leanest = tables(models[1], pp, in_flight)
        raise _memory_error(leanest, device_memory, 1, recomputing=True)
    return _plan(
        config,
        t,
        solution,
        1,
        dp,
        micro_batches,
        accounting.name,
        device_memory,
        models[0].unit,
        chosen=chosen,
    )


def _plan(
    config, t, solution, vpp, dp, micro_batches, precision, device_memory, unit, chosen=None
) -> Plan:
    even, exact = even_bounds(config.model.num_layers, t.pp * vpp)
    return Plan(
        planned=_split(t, solution.bounds, chosen),
        even=_split(t, even, chosen),
        even_is_megatron_default=exact,
        proven=solution.proven,
        pp=t.pp,
        vpp=vpp,
        tp=config.parallel.tp,
        dp=dp,
        zero=config.zero.stage,
        micro_batches=micro_batches,
        precision=precision,
        recompute="full, per stage" if chosen else recompute_label(config),
        device_memory=device_memory,
        unit=unit,
        auto_recompute=chosen is not None,
    )


def recompute_label(config: Config) -> str:
    """'none', 'full', 'selective on widest:3', 'full on [0, 9]'."""
    p = config.parallel
    if p.recompute == "none" or p.recompute_layer_choice()[0] == "all":
        return p.recompute
    return f"{p.recompute} on {p.recompute_layers}"


def plan_layout(
    config: Config,
    *,
    pp: int | None = None,
    vpp: int = 1,
    dp: int = 1,
    device_memory: int | None = None,
) -> str:
    """The `pipeline_model_parallel_layout` for `parallel.pipeline_layout: auto`.

    By the FLOP model only, never measured times, so that every rank derives the same layout.
    """
    return plan(config, pp=pp, vpp=vpp, dp=dp, device_memory=device_memory).planned.layout


def stage_memory(config: Config, parallel, device: str = "cuda") -> list[int]:
    """The memory estimate of each pipeline rank of a resolved `training.distributed`
    ParallelPlan (its layout, or the even split; its DP size), in bytes."""
    vpp = parallel.vpp or 1
    model = cost_model(config, pp=parallel.pp, dp=parallel.dp, device=device)
    t = tables(
        model, parallel.pp, micro_batches_in_flight(parallel.pp, vpp, parallel.micro_batches)
    )
    if parallel.layout is None:
        bounds, _ = even_bounds(config.model.num_layers, parallel.pp * vpp)
    else:
        bounds = layout_bounds(parallel.layout, parallel.pp)
    return [round(m) for m in rank_totals(t.memory, bounds, parallel.pp)]


def _check(config: Config, pp: int, vpp: int, dp: int) -> int:
    """Refuse sizes Megatron cannot run; return the number of micro batches per step."""
    n = config.model.num_layers
    for key, value in (("PP", pp), ("VPP", vpp), ("DP", dp)):
        if value < 1:
            raise UserError(f"{key}={value}: must be at least 1")
    if pp > n:
        raise UserError(f"PP={pp} is more than the model's {n} layers; choose PP <= {n}")
    train = config.train
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x DP = {train.micro_batch_size} x {dp}; change one of them"
        )
    micro_batches = train.global_batch_size // (train.micro_batch_size * dp)
    if vpp > 1:
        if pp == 1:
            raise UserError(f"VPP={vpp} needs PP >= 2 (interleaving is a pipeline schedule)")
        if pp * vpp > n:
            raise UserError(
                f"VPP={vpp} does not divide the {n} layers into PP x VPP = {pp * vpp} virtual "
                f"stages of at least one layer; choose VPP <= {n // pp}"
            )
        if micro_batches % pp:
            raise UserError(
                f"VPP={vpp}: the interleaved schedule needs the {micro_batches} micro batches "
                f"per step (global / (micro x DP)) to be a multiple of PP={pp}; change "
                "train.global_batch_size or --dp, or use VPP=1"
            )
    return micro_batches


def _memory_error(t: Tables, limit: float, vpp: int, recomputing: bool = False) -> UserError:
    """Name the stage that overflows in the split that needs the least memory, and by how much."""
    leanest = solve(Tables(np.where(np.isfinite(t.load), t.memory, INF), t.memory, t.pp))
    need = rank_totals(t.memory, leanest.bounds, t.pp)
    rank = int(np.argmax(need))
    sizes = f"PP={t.pp}" + (f" x VPP={vpp}" if vpp > 1 else "")
    return UserError(
        f"device memory {format_bytes(limit)}: no split of {t.num_layers} layers over {sizes} "
        f"fits; the leanest split still needs {format_bytes(need[rank])} on stage {rank} "
        f"({format_bytes(need[rank] - limit)} over); raise the limit to at least "
        f"{math.ceil(need[rank] / 2**30)}GiB, or save memory with "
        + ("" if recomputing else "full recomputation, ")
        + "a higher ZeRO stage or DP, or a larger PP"
    )


def _split(t: Tables, bounds: tuple[int, ...], chosen: dict | None = None) -> Split:
    loads = rank_totals(t.load, bounds, t.pp)
    memory = rank_totals(t.memory, bounds, t.pp)
    stages = tuple(
        Stage(
            rank=r,
            chunks=tuple(
                tuple(range(bounds[c], bounds[c + 1])) for c in range(r, t.num_chunks, t.pp)
            ),
            embedding=r == 0,
            output=r == t.pp - 1,
            cost=loads[r],
            memory_bytes=round(memory[r]),
            recomputed=() if chosen is None else chosen[r, bounds[r], bounds[r + 1]],
        )
        for r in range(t.pp)
    )
    layout = layout_string(bounds)
    check_layout(layout, bounds, t.pp)
    return Split(bounds, stages, layout)


def layout_string(bounds: tuple[int, ...]) -> str:
    """Chunk c holds layers [bounds[c], bounds[c+1]); the first adds E, the last L."""
    last = len(bounds) - 2
    entries = []
    for c in range(last + 1):
        k = bounds[c + 1] - bounds[c]
        body = "" if k == 0 else "t" if k == 1 else f"t*{k}"
        entries.append(("E" if c == 0 else "") + body + ("L" if c == last else ""))
    return "|".join(entries)


def layout_bounds(layout: str, pp: int) -> tuple[int, ...]:
    """The chunk boundaries of a Megatron layout (chunk c: virtual stage c // pp of rank c % pp)."""
    parsed = _parse_layout(layout, pp)
    counts = _decoder_counts(parsed, pp)
    return tuple(int(b) for b in np.concatenate([[0], np.cumsum(counts)]))


def _parse_layout(layout: str, pp: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.pipeline_parallel_layer_layout import (
            PipelineParallelLayerLayout,
        )
    return PipelineParallelLayerLayout(layout, pp)


def _decoder_counts(parsed, pp: int) -> list[int]:
    from megatron.core.transformer.enums import LayerType

    chunks = sum(len(stages) for stages in parsed.layout)
    return [parsed.layout[c % pp][c // pp].count(LayerType.decoder) for c in range(chunks)]


def check_layout(layout: str, bounds: tuple[int, ...], pp: int) -> None:
    """Parse `layout` with Megatron-Core and check it places every layer where `bounds` says."""
    parsed = _parse_layout(layout, pp)
    parsed.validate_layer_layout(num_layers=bounds[-1], mtp_num_layers=None)
    counts = _decoder_counts(parsed, pp)
    if counts != [b - a for a, b in zip(bounds, bounds[1:])]:
        raise RuntimeError(f"layout {layout!r} parses to {counts} layers per chunk, not {bounds}")

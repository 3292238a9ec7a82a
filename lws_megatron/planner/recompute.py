"""`plan --recompute auto`: per pipeline stage, the fewest layers to recompute (full, widest
first) that fit the device memory.

With one chunk per rank a stage's compute and memory depend on its own layers only, so the
planner's tables can hold, for every candidate stage (chunk, first layer, end), the stage with
the fewest of its layers recomputed that fits: its widest ones first, as `widest_layers` ranks
them, until it fits or none are left (then the stage, all recomputed, is over the limit and
the solver does not take it). The exact split over those tables is the fastest plan that fits,
each stage recomputing no more than it must.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lws_megatron.config import Config
from lws_megatron.errors import UserError
from lws_megatron.planner.costs import Block, CostModel
from lws_megatron.planner.memory import widest_layers
from lws_megatron.planner.partition import INF, Tables


def with_recompute(config: Config, kind: str, layers: str | list[int] = "all") -> Config:
    parallel = dataclasses.replace(config.parallel, recompute=kind, recompute_layers=layers)
    return dataclasses.replace(config, parallel=parallel)


def chunk_memory(
    model: CostModel, blocks: list[Block], first: bool, last: bool, in_flight: int
) -> float:
    """A chunk's memory as `partition.tables` counts it, for explicit blocks (in layer order)."""
    extra = [b for b, at in ((model.embedding, first), (model.output, last)) if at]
    params = sum(b.params for b in blocks + extra)
    held = sum(b.activation_bytes for b in blocks + extra)
    head = held + sum(b.transient_bytes for b in extra)
    below, recomputing = 0.0, 0.0
    for block in blocks:
        below += block.activation_bytes
        recomputing = max(recomputing, below + block.transient_bytes)
    recomputing += model.embedding.activation_bytes if first else 0.0
    return model.bytes_per_param * params + (in_flight - 1) * held + max(head, recomputing)


def auto_tables(
    config: Config,
    plain: CostModel,
    recomputed: CostModel,
    pp: int,
    in_flight: tuple[int, ...],
    limit: float,
) -> tuple[Tables, dict[tuple[int, int, int], tuple[int, ...]]]:
    """Tables of the stages that recompute the fewest layers to fit `limit`, and those layers
    per (chunk, first layer, end). `plain` prices no recomputation, `recomputed` full
    recomputation of every layer."""
    if len(in_flight) != pp:
        raise UserError(
            "--recompute auto plans one chunk per pipeline rank; give --vpp 1, or pick the "
            "layers yourself with parallel.recompute_layers"
        )
    n = len(plain.layers)
    rank = {layer: i for i, layer in enumerate(widest_layers(config))}
    load = np.full((pp, n + 1, n + 1), INF)
    memory = np.zeros_like(load)
    chosen = {}
    for c in range(pp):
        first, last = c == 0, c == pp - 1
        extra = sum(b.cost for b, at in ((plain.embedding, first), (plain.output, last)) if at)
        for i in range(n + 1):
            for j in range(i if first or last else i + 1, n + 1):
                widest = sorted(range(i, j), key=rank.__getitem__)
                for k in range(len(widest) + 1):
                    picked = set(widest[:k])
                    blocks = [(recomputed if x in picked else plain).layers[x] for x in range(i, j)]
                    used = chunk_memory(plain, blocks, first, last, in_flight[c])
                    if used <= limit or k == len(widest):
                        break
                load[c, i, j] = sum(b.cost for b in blocks) + extra
                memory[c, i, j] = used
                chosen[c, i, j] = tuple(sorted(picked))
    return Tables(load, memory, pp), chosen

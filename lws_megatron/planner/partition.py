"""Contiguous partitioning of layers into pipeline chunks, minimising the slowest rank.

The layers 0..N-1 are cut into C = pp * vpp contiguous chunks; chunk c runs on rank c % pp
(Megatron's virtual-stage order), the first chunk also holds the embedding, the last the
output head. The objective, compared lexicographically: the largest rank load, then the sum
of squared rank loads (the tie-break: among optimal bottlenecks, the split closest to even).
A rank's memory (sum over its chunks) must stay within the limit. One chunk per rank is
solved exactly by dynamic programming; several (interleaved) by branch and bound, exact
unless it runs out of budget, which it then reports.

Pure numpy; the planner builds the tables from a `CostModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lws_megatron.errors import UserError
from lws_megatron.planner.costs import CostModel

INF = math.inf
# Distinct states the interleaved search may visit (about a second of Python) before it
# settles for the best split found.
SEARCH_BUDGET = 20_000


@dataclass(frozen=True)
class Tables:
    """load[c, i, j] and memory[c, i, j]: chunk c holding layers [i, j); load inf if not allowed.

    Middle chunks must hold a layer; the first and the last may hold only the embedding or
    the head (a stage "E" or "L" in Megatron's layout).
    """

    load: np.ndarray
    memory: np.ndarray
    pp: int

    @property
    def num_layers(self) -> int:
        return self.load.shape[1] - 1

    @property
    def num_chunks(self) -> int:
        return self.load.shape[0]


def tables(model: CostModel, pp: int, in_flight: tuple[int, ...]) -> Tables:
    """Chunk tables from prefix sums: O(C N^2) numbers, each a difference of two sums.

    A chunk's memory: its weights' state; what its blocks keep, for each micro batch in flight
    but the one in backward; and that one's peak in backward: all it keeps while the head's
    backward runs (and makes its transient), or, lower down, the layers still below a
    recomputed layer plus that layer's activations made again.
    """
    chunks = len(in_flight)
    n = len(model.layers)
    cost = _spans([b.cost for b in model.layers])
    params = _spans([b.params for b in model.layers])
    kept = [b.activation_bytes for b in model.layers]
    acts = _spans(kept)
    prefix = np.concatenate([[0.0], np.cumsum(kept)])
    rebuilt = np.array([b.transient_bytes for b in model.layers])
    recomputing = _span_max(prefix[1:] + rebuilt) - prefix[:-1, None]
    recomputing = np.vstack([recomputing, np.zeros(n + 1)])
    load = np.empty((chunks, n + 1, n + 1))
    memory = np.empty_like(load)
    for c in range(chunks):
        extra = [b for b, at in ((model.embedding, c == 0), (model.output, c == chunks - 1)) if at]
        load[c] = cost + sum(b.cost for b in extra)
        memory[c] = model.bytes_per_param * (params + sum(b.params for b in extra))
        held = acts + sum(b.activation_bytes for b in extra)
        memory[c] += (in_flight[c] - 1) * held
        head = held + sum(b.transient_bytes for b in extra)
        memory[c] += np.maximum(head, recomputing + model.embedding.activation_bytes * (c == 0))
    lower = np.tril(np.ones((n + 1, n + 1), dtype=bool), k=-1)
    load[:, lower] = INF
    empty = np.eye(n + 1, dtype=bool)
    load[1:-1, empty] = INF
    return Tables(load, memory, pp)


def _spans(values: list[float]) -> np.ndarray:
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    return prefix[None, :] - prefix[:, None]


def _span_max(values: np.ndarray) -> np.ndarray:
    """[i, j] for i < n: the largest of values[i:j]; 0 for an empty span."""
    n = len(values)
    table = np.zeros((n, n + 1))
    for i in range(n):
        table[i, i + 1 :] = np.maximum.accumulate(values[i:])
    return table


def rank_totals(table: np.ndarray, bounds: tuple[int, ...], pp: int) -> list[float]:
    """Per rank, the sum of its chunks' entries in `table` (load or memory)."""
    totals = [0.0] * pp
    for c in range(len(bounds) - 1):
        totals[c % pp] += float(table[c, bounds[c], bounds[c + 1]])
    return totals


@dataclass(frozen=True)
class Solution:
    """Chunk boundaries 0 = b_0 <= ... <= b_C = N; `proven` False if the search hit its budget."""

    bounds: tuple[int, ...]
    proven: bool = True


def solve(t: Tables, limit: float | None = None, budget: int = SEARCH_BUDGET) -> Solution | None:
    """The optimal split, or None if provably no split fits `limit`.

    Raises UserError if the interleaved search spends `budget` visits without finding a split
    that fits.
    """
    if t.num_chunks == t.pp:
        bounds = _solve_stages(t, limit)
        return None if bounds is None else Solution(bounds)
    return _search(t, limit, budget)


def _allowed(t: Tables, limit: float | None) -> np.ndarray:
    """Chunk loads with chunks that alone exceed the memory limit forbidden."""
    return t.load if limit is None else np.where(t.memory <= limit, t.load, INF)


def _solve_stages(t: Tables, limit: float | None) -> tuple[int, ...] | None:
    """One chunk per rank: exact dynamic programme over prefixes, O(pp N^2).

    Pass 1: best[c][j] = min over i of max(best[c-1][i], load[c, i, j]) gives the optimal
    bottleneck B. Pass 2 minimises the sum of squares over splits whose every stage is <= B.
    Both passes are exact because each stage's load and memory depend only on its own
    layers and its index, which the state (stage, prefix end) fixes.
    """
    w = _allowed(t, limit)
    best = w[0, 0]
    for c in range(1, t.num_chunks):
        best = np.min(np.maximum(best[:, None], w[c]), axis=0)
    bottleneck = best[t.num_layers]
    if not math.isfinite(bottleneck):
        return None
    squares = np.where(w <= bottleneck, w * w, INF)
    total, back = squares[0, 0], []
    for c in range(1, t.num_chunks):
        step = total[:, None] + squares[c]
        back.append(np.argmin(step, axis=0))
        total = step.min(axis=0)
    bounds = [t.num_layers]
    for arg in reversed(back):
        bounds.append(int(arg[bounds[-1]]))
    return tuple([0] + bounds[::-1])


def _search(t: Tables, limit: float | None, budget: int) -> Solution | None:
    """Several chunks per rank (interleaved schedule): branch and bound, exact within `budget`.

    Rank loads add up over chunks far apart in depth, so no prefix DP applies (with many chunks
    per rank the problem contains PARTITION). Depth-first over the chunk boundaries, each
    distinct (chunk, boundary, rank loads, rank memories) state once, pruned by the incumbent
    (the chunk-balanced split, improved by moving single boundaries) against a lower bound:
    placed loads plus the least remaining load water-filled over the ranks that still have
    chunks. Past `budget` visits the best split found is returned with `proven` False.
    """
    allowed = _allowed(t, limit)
    w, mem = allowed.tolist(), t.memory.tolist()
    cap = INF if limit is None else limit
    n, chunks, pp = t.num_layers, t.num_chunks, t.pp
    remaining = _least_remaining(allowed)
    head = w[-1][n][n]  # the last chunk, on the last rank, holds at least the head
    incumbent: list = [(INF, INF), None]
    seed = _solve_stages(Tables(allowed, t.memory, chunks), None)
    if seed is not None:
        incumbent[:] = _improve(seed, w, mem, cap, pp)
    loads, mems, bounds = [0.0] * pp, [0.0] * pp, [0]
    explored: set[tuple] = set()

    def visit(c: int, i: int) -> None:
        if c == chunks:
            key = (max(loads), sum(x * x for x in loads))
            if key < incumbent[0]:
                incumbent[:] = [key, tuple(bounds)]
            return
        r = c % pp
        for j in range(n if c == chunks - 1 else i, n + 1):
            load, used = loads[r] + w[c][i][j], mems[r] + mem[c][i][j]
            if load > incumbent[0][0] or used > cap:
                if math.isfinite(w[c][i][j]):
                    break  # loads and memory only grow with j
                continue
            before = loads[r], mems[r]
            loads[r], mems[r] = load, used
            state = (c + 1, j, *loads, *mems)
            rest = remaining[c + 1][j]
            fresh = state not in explored and math.isfinite(rest)
            if fresh and _promising(loads, rest, chunks - c - 1, head, incumbent[0]):
                explored.add(state)
                if len(explored) > budget:
                    raise _Budget
                bounds.append(j)
                visit(c + 1, j)
                bounds.pop()
            loads[r], mems[r] = before

    try:
        visit(0, 0)
    except _Budget:
        if incumbent[1] is None:
            raise UserError(
                f"no split of {n} layers into {chunks} virtual stages within the memory limit "
                f"found in {budget:,} search steps; raise the limit or use a smaller VPP"
            ) from None
        return Solution(incumbent[1], proven=False)
    return None if incumbent[1] is None else Solution(incumbent[1])


class _Budget(Exception):
    """The interleaved search spent its visits."""


def _promising(
    loads: list[float],
    rest: float,
    left: int,
    head: float,
    best: tuple[float, float],
) -> bool:
    """Whether `left` more chunks holding `rest` load can beat `best` = (max, sum of squares).

    Lower bound: the ranks that still have chunks (all, or the last `left` in the final
    round) take the remaining load as water, the last rank at least its load plus the head;
    the other ranks are final.
    """
    pp = len(loads)
    if max(max(loads), (sum(loads) + rest) / pp) > best[0]:
        return False  # the cheap bound already fails
    first = max(pp - left, 0)
    floors, fixed = loads[first:], loads[:first]
    if left:
        floors[-1] += head
        rest -= head
    level, squares = _water_fill(floors, rest)
    bound = max([level, *fixed])
    if bound != best[0]:
        return bound < best[0]
    return squares + sum(x * x for x in fixed) < best[1]


def _water_fill(floors: list[float], water: float) -> tuple[float, float]:
    """Pour `water` over ranks standing at `floors`: the highest rank after, the sum of squares."""
    if not floors:
        return -INF, 0.0
    xs = sorted(floors)
    filled = 0.0
    for k in range(1, len(xs) + 1):
        filled += xs[k - 1]
        level = (filled + water) / k
        if k == len(xs) or level <= xs[k]:
            return max(level, xs[-1]), k * level * level + sum(y * y for y in xs[k:])
    raise AssertionError("unreachable")


def _improve(bounds: tuple[int, ...], w: list, mem: list, cap: float, pp: int) -> list:
    """Move single boundaries, each to its best place, while that lowers (max, sum of squares).

    Returns [key, bounds], the key infinite if the split breaks the memory limit.
    """

    def key(b: list[int]) -> tuple[float, float]:
        loads, used = [0.0] * pp, [0.0] * pp
        for c in range(len(b) - 1):
            loads[c % pp] += w[c][b[c]][b[c + 1]]
            used[c % pp] += mem[c][b[c]][b[c + 1]]
        if max(used) > cap or not all(map(math.isfinite, loads)):
            return INF, INF
        return max(loads), sum(x * x for x in loads)

    current, best = list(bounds), key(list(bounds))
    moved = True
    while moved:
        moved = False
        for k in range(1, len(current) - 1):
            for b in range(current[k - 1], current[k + 1] + 1):
                trial = current[:k] + [b] + current[k + 1 :]
                if (score := key(trial)) < best:
                    current, best, moved = trial, score, True
    return [best, tuple(current)] if math.isfinite(best[0]) else [(INF, INF), None]


def _least_remaining(w: np.ndarray) -> list[list[float]]:
    """remaining[c][j]: the least total load of chunks c.. covering layers [j, N)."""
    chunks, n1 = w.shape[0], w.shape[1]
    rows = [np.full(n1, INF)]
    rows[0][-1] = 0.0
    for c in reversed(range(chunks)):
        rows.append(np.min(w[c] + rows[-1][None, :], axis=1))
    return [row.tolist() for row in reversed(rows)]


def even_bounds(num_layers: int, chunks: int) -> tuple[tuple[int, ...], bool]:
    """Megatron's default split into equal layer counts, and whether it is exact.

    Megatron refuses a layer count that the chunks do not divide; then the count-balanced split
    (the first N mod C chunks one layer more) stands in for comparison.
    """
    base, extra = divmod(num_layers, chunks)
    bounds = [0]
    for c in range(chunks):
        bounds.append(bounds[-1] + base + (c < extra))
    return tuple(bounds), extra == 0

"""Sample order that depends on the data and the seed only, never on how long the run is.

Megatron's GPTDataset sizes its epochs and shuffles by the number of samples asked for, so a run
asked to go longer would see other samples at the same position. Instead each dataset is built
as exactly one epoch, `Epochs` repeats it without end (every later epoch in a fresh order drawn
from the seed, the dataset and the epoch) and `Blend` interleaves datasets by weight with an
assignment that repeats every period. Position i therefore reads the same tokens in any run long
enough to reach it: `max_steps` can grow between launches without changing what a step sees.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from megatron.core.datasets.helpers import build_blending_indices

from lws_megatron.errors import UserError

BLEND_PERIOD = 1 << 16
BLEND_MIN_DRAWS = 16  # samples the smallest dataset gets per period
BLEND_MAX_PERIOD = 1 << 22


class Epochs:
    """An endless stream over one epoch of `n` samples: position i is sample `order_e[i % n]`
    of the epoch, e = i // n. Epoch 0 keeps the dataset's own (Megatron-shuffled) order; later
    epochs are reshuffled from (seed, stream, e) when first read, so position i never depends
    on the run's length and reaching it costs one shuffle of its epoch, not of those before."""

    def __init__(self, epoch: Sequence, seed: int, stream: int) -> None:
        self.epoch, self.seed, self.stream = epoch, seed, stream
        self.size = len(epoch)
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs read: a batch may straddle

    def position(self, i: int) -> int:
        """Which sample of the epoch position i of the stream is."""
        e, r = divmod(i, self.size)
        return r if e == 0 else int(self._order(e)[r])

    def _order(self, e: int) -> np.ndarray:
        if e not in self._orders:
            if len(self._orders) == 2:
                del self._orders[min(self._orders)]
            seeds = np.random.SeedSequence([self.seed, self.stream, e])
            self._orders[e] = np.random.Generator(np.random.PCG64(seeds)).permutation(self.size)
        return self._orders[e]

    def __getitem__(self, i: int) -> Any:
        return self.epoch[self.position(i)]


class Blend:
    """Endless streams interleaved by weight. Megatron's greedy `build_blending_indices` (each
    sample goes to the stream furthest below its share) is run for one period and repeated:
    position i reads sample `p * per_period[k] + dataset_sample_index[r]` of stream
    k = dataset_index[r], with p, r = divmod(i, period). The period depends on the shares alone,
    so the assignment of every position is fixed by the weights, whatever the run's length."""

    def __init__(self, streams: Sequence, shares: Sequence[float], names: Sequence[str]) -> None:
        shares = np.asarray(shares, dtype=np.float64) / math.fsum(shares)
        smallest = int(np.argmin(shares))
        self.period = max(BLEND_PERIOD, math.ceil(BLEND_MIN_DRAWS / shares[smallest]))
        if self.period > BLEND_MAX_PERIOD:
            raise UserError(
                f"data.path: {names[smallest]} would be {shares[smallest]:.2g} of the blend, too "
                f"small a share to draw (under {BLEND_MIN_DRAWS / BLEND_MAX_PERIOD:.2g}); give "
                "it a larger weight or leave it out"
            )
        self.streams = list(streams)
        self.dataset_index = np.zeros(self.period, dtype=np.int16)
        self.dataset_sample_index = np.zeros(self.period, dtype=np.int64)
        build_blending_indices(
            self.dataset_index,
            self.dataset_sample_index,
            shares,
            len(self.streams),
            self.period,
            False,
        )
        self.per_period = np.bincount(self.dataset_index, minlength=len(self.streams))

    def source(self, i: int) -> tuple[int, int]:
        """(stream, position in that stream) read at position i."""
        p, r = divmod(i, self.period)
        k = int(self.dataset_index[r])
        return k, p * int(self.per_period[k]) + int(self.dataset_sample_index[r])

    def __getitem__(self, i: int) -> Any:
        k, j = self.source(i)
        return self.streams[k][j]

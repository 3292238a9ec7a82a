"""The paper's evaluation protocol: the whole held-out split, one sequence per document.

Each document is cut to the sequence length (plus the one token its last label needs), padded,
and only its own tokens are scored, so the validation loss is the mean over every token of the
split that a model of this context can predict. Documents are dealt round-robin to the
data-parallel ranks; every rank runs the same number of micro batches (the last ones padded
with unscored rows), so the ranks' collectives line up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lws_megatron.dataset.indexed import read_index, read_tokens
from lws_megatron.training.data import Batch


class DocumentBatches(Sequence):
    """This rank's micro batches of whole documents, built when read (a split can be large)."""

    def __init__(
        self, prefixes: list[str], seq_length: int, micro: int, dp_rank: int, dp: int, pad_id: int
    ):
        self.seq_length, self.micro, self.pad_id = seq_length, micro, pad_id
        self._docs: list[np.ndarray] = []
        for prefix in prefixes:
            index = read_index(prefix)
            tokens = read_tokens(prefix, index.dtype)
            starts = index.pointers // index.dtype.itemsize
            self._docs += [tokens[s : s + n] for s, n in zip(starts, index.lengths) if n >= 2]
        self.total_documents = len(self._docs)
        self._mine = self._docs[dp_rank::dp]
        per_rank = math.ceil(self.total_documents / dp)  # every rank pads to the largest share
        self._len = math.ceil(per_rank / micro)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < self._len:
            raise IndexError(i)
        s = self.seq_length
        tokens = torch.full((self.micro, s), self.pad_id, dtype=torch.int64)
        labels = torch.full((self.micro, s), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(self.micro, s)
        for row, d in enumerate(range(i * self.micro, (i + 1) * self.micro)):
            if d >= len(self._mine):
                continue
            doc = torch.from_numpy(self._mine[d][: s + 1].astype(np.int64))
            n = len(doc) - 1
            tokens[row, :n], labels[row, :n], mask[row, :n] = doc[:-1], doc[1:], 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": mask}

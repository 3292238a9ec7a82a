"""The layout-free format without training: a range of a flattened weight is the boxes that
cover it exactly; slices written by some ranks read back whole or at another split, and by
PyTorch's own DCP reader; the hashes are those of the bytes written; `.metadata` that would run
code is refused; a tensor the ranks do not cover exactly once is never recorded."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from lws_megatron.errors import UserError
from lws_megatron.training import shards
from lws_megatron.training.model_state import flat_boxes
from lws_megatron.training.shards import Slice


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 5, 4), (2, 3, 2, 5)])
def test_a_flat_range_is_boxes_covering_it_in_order(shape):
    n, rng = torch.Size(shape).numel(), random.Random(0)
    flat = torch.arange(n).view(shape)
    for _ in range(50):
        lo = rng.randrange(n)
        hi = rng.randrange(lo + 1, n + 1)
        covered = []
        for box, first in flat_boxes(shape, lo, hi):
            part = flat
            for dim, (s, size) in enumerate(zip(box.start, box.size)):
                part = part.narrow(dim, s, size)
            assert part.flatten().tolist() == list(range(first, first + part.numel()))
            covered += part.flatten().tolist()
        assert covered == list(range(lo, hi))
        assert len(flat_boxes(shape, lo, hi)) <= 2 * len(shape) - 1


def _save(root: Path, full: torch.Tensor, splits: list[list[tuple]]) -> dict:
    """`full` saved as rank r's boxes splits[r] ((offset, size) each); meta.json's files."""
    written = []
    for rank, boxes in enumerate(splits):
        slices = []
        for offset, size in boxes:
            part = full
            for dim, (o, s) in enumerate(zip(offset, size)):
                part = part.narrow(dim, o, s)
            slices.append(Slice("w", tuple(full.shape), offset, part.clone()))
        written.append(shards.write_slices(root, shards.data_file(rank), slices))
    files = {rel: info for w in written for rel, info in w.files.items()}
    files.update(shards.write_metadata(root, shards.build_metadata(written)))
    return files


SPLIT = [[((0, 0), (2, 6))], [((2, 0), (2, 3)), ((2, 3), (2, 3))]]


def test_slices_read_back_at_another_split_from_the_files_they_need(tmp_path):
    full = torch.arange(24.0).view(4, 6)
    files = _save(tmp_path, full, SPLIT)
    for rel, info in files.items():  # the writer's hash is the file's
        data = (tmp_path / rel).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    metadata = shards.read_metadata(tmp_path / shards.METADATA)
    want = Slice("w", (4, 6), (1, 2), torch.zeros(3, 3, dtype=torch.float64))
    plan = shards.plan_reads(metadata, [want], tmp_path)
    assert sorted(plan) == ["__0_0.distcp", "__1_0.distcp"]
    shards.read_planned(tmp_path, metadata, plan)
    assert torch.equal(want.tensor, full[1:4, 2:5].double())
    only_first = Slice("w", (4, 6), (0, 1), torch.zeros(2, 4))
    assert sorted(shards.plan_reads(metadata, [only_first], tmp_path)) == ["__0_0.distcp"]


def test_pytorch_dcp_reads_the_files(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    full = torch.randn(4, 6)
    _save(tmp_path, full, SPLIT)
    state = {"w": torch.zeros(4, 6)}
    load(state, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(state["w"], full)


def test_a_shape_from_another_model_is_named(tmp_path):
    _save(tmp_path, torch.zeros(4, 6), SPLIT)
    metadata = shards.read_metadata(tmp_path / shards.METADATA)
    with pytest.raises(UserError, match=r"w has shape \[4, 6\] there and \[4, 7\] in this model"):
        shards.plan_reads(metadata, [Slice("w", (4, 7), (0, 0), torch.zeros(4, 7))], tmp_path)


def test_slices_that_miss_or_repeat_elements_are_not_recorded(tmp_path):
    full = torch.zeros(4, 6)
    with pytest.raises(RuntimeError, match="cover 18 of its 24 elements"):
        _save(tmp_path, full, [[((0, 0), (2, 6))], [((2, 0), (1, 6))]])
    with pytest.raises(RuntimeError, match="2 slices, 1 distinct"):
        _save(tmp_path, full, [[((0, 0), (2, 6))], [((0, 0), (2, 6))]])


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "CODE_RAN"
    (tmp_path / shards.METADATA).write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(UserError, match=r"refused to load: .*\(it asks for posix.system"):
        shards.read_metadata(tmp_path / shards.METADATA)
    assert not marker.exists()

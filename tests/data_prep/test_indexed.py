"""The Megatron indexed-dataset writer and reader."""

import os

import numpy as np
import pytest
from megatron.core.datasets import indexed_dataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from lws_megatron.dataset import indexed
from lws_megatron.dataset.indexed import IndexedWriter, token_dtype
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.errors import UserError


def test_token_dtype_at_the_uint16_boundary():
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.int32
    with pytest.raises(UserError):
        token_dtype(0)


def test_writer_keeps_the_largest_ids_of_each_width(tmp_path, stored_documents, make_dataset):
    for vocab_size, top in [(65_536, 65_535), (70_000, 69_999)]:
        docs = [np.array([0, 1, top]), np.array([top, 2])]
        prefix = make_dataset(tmp_path, docs, vocab_size, name=f"v{vocab_size}")
        assert stored_documents(prefix + "_train") == [d.tolist() for d in docs]
        verify_dataset(prefix)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_output_is_byte_identical_to_megatrons_builder(tmp_path, dtype):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 65_536, n) for n in rng.integers(1, 300, 500)]
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "megatron.idx"))
    writer = IndexedWriter(str(tmp_path / "ours"), np.dtype(dtype))
    for start in range(0, len(docs), 128):
        batch = docs[start : start + 128]
        writer.add(np.concatenate(batch), np.array([len(d) for d in batch]))
    writer.finish()
    writer.commit()
    for suffix in (".bin", ".idx"):
        ours, theirs = tmp_path / f"ours{suffix}", tmp_path / f"megatron{suffix}"
        assert ours.read_bytes() == theirs.read_bytes()


def test_the_restated_format_is_megatrons():
    assert indexed._INDEX_HEADER == indexed_dataset._INDEX_HEADER
    assert indexed.DTYPE_CODES == {getattr(np, d.name): d.value for d in indexed_dataset.DType}
    assert indexed.get_bin_path("a/b") == indexed_dataset.get_bin_path("a/b")
    assert indexed.get_idx_path("a/b") == indexed_dataset.get_idx_path("a/b")


def test_partial_files_are_not_a_dataset(tmp_path):
    writer = IndexedWriter(str(tmp_path / "x_train"), np.dtype(np.uint16))
    writer.add(np.array([5, 6, 7]), np.array([3]))
    writer.finish()
    assert all(name.endswith(".partial") for name in os.listdir(tmp_path))
    with pytest.raises(UserError, match="no manifest"):
        verify_dataset(str(tmp_path / "x"))
    writer.discard()
    assert os.listdir(tmp_path) == []

"""The checks run before anything reads a dataset (lws_megatron.dataset.integrity)."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep import inspect_dataset as inspect_cli
from lws_megatron.dataset.indexed import read_index, read_tokens
from lws_megatron.dataset.integrity import parity_zeros, verify_dataset
from lws_megatron.dataset.manifest import manifest_path, read_manifest, write_manifest
from lws_megatron.errors import UserError


def rewrite_as_paper_erratum(tmp_path: Path, source: str, make_dataset) -> str:
    """Store a dataset's ids as int32 and read them back as uint16, every record consistent."""
    index = read_index(source + "_train")
    wide = np.asarray(read_tokens(source + "_train", index.dtype)).astype(np.int32).view(np.uint16)
    manifest = read_manifest(manifest_path(source))
    lengths = np.asarray(index.lengths) * 2
    docs = np.split(wide, np.cumsum(lengths)[:-1])
    return make_dataset(tmp_path, docs, manifest.tokenizer.vocab_size, name="erratum")


def test_inspect_catches_int32_tokens_read_as_uint16(
    tmp_path, good_dataset, capsys, stored_documents, make_dataset
):
    corrupted = rewrite_as_paper_erratum(tmp_path, good_dataset, make_dataset)
    first = stored_documents(corrupted + "_train")[0]
    assert first[1::2] == [0] * (len(first) // 2)
    with pytest.raises(UserError, match="int32/uint16 mix-up"):
        verify_dataset(corrupted)
    assert inspect_cli.main([corrupted]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "odd positions are 0" in err and "re-run" in err


def test_index_relabelled_uint16_is_caught(tmp_path, good_dataset):
    idx = Path(good_dataset + "_train.idx")
    data = bytearray(idx.read_bytes())
    data[17] = 4  # the dtype code: int32
    idx.write_bytes(bytes(data))
    with pytest.raises(UserError, match="stores int32 tokens but the manifest records uint16"):
        verify_dataset(good_dataset)


def test_uint16_tokens_read_as_int32_are_caught(tmp_path, make_dataset):
    rng = np.random.default_rng(1)
    narrow = rng.integers(1, 60_000, 4000).astype(np.uint16)
    prefix = make_dataset(tmp_path, [narrow.view(np.int32)], 70_000)
    with pytest.raises(UserError, match="two 16-bit ids packed"):
        verify_dataset(prefix)


def test_legitimate_zeros_pass_the_mixup_detector(tmp_path, make_dataset):
    rng = np.random.default_rng(2)
    rare_pad = [
        np.where(rng.random(n) < 0.01, 0, rng.integers(2, 1000, n))
        for n in rng.integers(50, 500, 300)
    ]
    verify_dataset(make_dataset(tmp_path, rare_pad, 1000, name="rare"))
    eod_zero_short_docs = [np.array([rng.integers(1, 1000), 0]) for _ in range(3000)]
    prefix = make_dataset(tmp_path, eod_zero_short_docs, 1000, name="short")
    zeros = parity_zeros(
        read_tokens(prefix + "_train", np.dtype(np.uint16)), read_index(prefix + "_train")
    )
    assert zeros.odd == 0.0
    verify_dataset(prefix)


def test_ids_beyond_the_vocabulary_are_caught(tmp_path, make_dataset):
    docs = [np.arange(2, 500), np.array([5, 999, 7])]
    with pytest.raises(UserError, match=r"first 999 at token 499 \(document 1\)"):
        verify_dataset(make_dataset(tmp_path, docs, 900))


def test_index_and_data_size_must_agree(good_dataset):
    data = Path(good_dataset + "_train.bin")
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(UserError, match="do not belong together"):
        verify_dataset(good_dataset)


def test_files_must_match_the_manifest(good_dataset, tok):
    data = Path(good_dataset + "_train.bin")
    tokens = np.frombuffer(data.read_bytes(), dtype=np.uint16).copy()
    tokens[3] = 5 if tokens[3] != 5 else 6
    data.write_bytes(tokens.tobytes())
    verify_dataset(good_dataset, hash_bin=False)
    with pytest.raises(UserError, match="_train.bin differs from the one the manifest recorded"):
        verify_dataset(good_dataset)
    with pytest.raises(UserError, match="not with the tokenizer given"):
        verify_dataset(good_dataset, tokenizer_fingerprint="f" * 64)
    with pytest.raises(UserError, match="only 10 embeddings"):
        verify_dataset(good_dataset, vocab_size=10)
    manifest = read_manifest(manifest_path(good_dataset))
    split = dataclasses.replace(manifest.splits["train"], idx_sha256="0" * 64)
    write_manifest(
        manifest_path(good_dataset), dataclasses.replace(manifest, splits={"train": split})
    )
    with pytest.raises(UserError, match="_train.idx differs from the one the manifest recorded"):
        verify_dataset(good_dataset + "_train")
    with pytest.raises(UserError, match="has no valid split"):
        verify_dataset(good_dataset + "_valid")
    os.remove(manifest_path(good_dataset))
    with pytest.raises(UserError, match="did not finish"):
        verify_dataset(good_dataset)

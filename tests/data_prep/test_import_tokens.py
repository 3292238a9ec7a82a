"""data_prep.import_tokens: pre-tokenized flat token files into checked indexed datasets."""

import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep import import_tokens as import_cli
from data_prep.import_tokens import import_tokens
from lws_megatron.dataset.indexed import read_tokens
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.dataset.manifest import manifest_path, read_manifest
from lws_megatron.errors import UserError


@pytest.fixture(scope="module")
def documents(tok, sample_docs) -> list[list[int]]:
    """Real documents, each ending with the tokenizer's end-of-document id (1)."""
    texts = [f"{doc} (copy {i})" for i in range(60) for doc in sample_docs]
    return tok.encode(texts, append_eod=True)


def stored(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_npy_and_raw_files_round_trip_token_for_token(tmp_path, tok, tok_path, documents):
    flat = np.concatenate([np.array(d, dtype=np.uint32) for d in documents])
    k = len(documents) // 2
    cut = sum(map(len, documents[: k + 1])) - 2  # inside document k: a.npy ends without eod
    np.save(tmp_path / "a.npy", flat[:cut])
    flat[cut:].astype(np.uint16).tofile(tmp_path / "b.bin")  # OLMo-style: raw ids, no header
    first = import_tokens([str(tmp_path / "a.npy")], "uint32", tok_path, str(tmp_path / "one"))
    second = import_tokens([str(tmp_path / "b.bin")], "uint16", tok_path, str(tmp_path / "two"))
    assert (
        stored(str(tmp_path / "one_train")) + stored(str(tmp_path / "two_train"))
        == documents[:k] + [documents[k][:-2], documents[k][-2:]] + documents[k + 1 :]
    )
    assert first.dtype == "uint16" and first.tokenizer.eod_id == tok.eod
    assert (first.append_eod, second.append_eod) == (False, True)
    assert first.tool == "data_prep.import_tokens" and first.inputs[0].bytes == os.path.getsize(
        tmp_path / "a.npy"
    )
    verify_dataset(str(tmp_path / "two"), tokenizer_fingerprint=tok.fingerprint)

    np.save(tmp_path / "all.npy", np.concatenate([flat, [tok.eod, tok.eod]]).astype(np.uint32))
    assert (
        import_cli.main(
            [
                "--input",
                str(tmp_path / "all.npy"),
                "--dtype",
                "uint32",
                "--tokenizer",
                tok_path,
                "--output-prefix",
                str(tmp_path / "split"),
                "--valid-fraction",
                "0.3",
            ]
        )
        == 0
    )
    manifest = read_manifest(manifest_path(str(tmp_path / "split")))
    train, valid = stored(str(tmp_path / "split_train")), stored(str(tmp_path / "split_valid"))
    assert len(valid) > 0 and sorted(train + valid) == sorted(documents)
    assert manifest.skipped["empty_documents"] == 2 and manifest.documents == len(documents)
    assert read_tokens(str(tmp_path / "split_valid"), np.dtype(np.uint16)).dtype == np.uint16


def test_the_stated_dtype_is_checked_never_guessed(tmp_path, tok_path, documents, capsys):
    flat = np.concatenate([np.array(d, dtype=np.uint32) for d in documents])
    np.save(tmp_path / "wide.npy", flat)
    flat.astype(np.uint16)[:-1].tofile(tmp_path / "odd.bin")
    (tmp_path / "big.bin").write_bytes(np.array([5, 4000, 1], dtype=np.uint32).tobytes())
    cases = [
        (
            "wide.npy",
            "uint16",
            {},
            r"holds uint32 ids \(its .npy header says so\) but --dtype is uint16",
        ),
        ("odd.bin", "uint32", {}, "not a whole number of uint32 ids"),
        ("big.bin", "uint32", {}, "id 4000 at token 1 is outside the 800-entry vocabulary"),
        ("wide.npy", "uint32", {"eod_id": 2}, "--eod-id 2 contradicts"),
    ]
    for name, dtype, kwargs, words in cases:
        with pytest.raises(UserError, match=words):
            import_tokens([str(tmp_path / name)], dtype, tok_path, str(tmp_path / "out"), **kwargs)
        assert not list(tmp_path.glob("out*"))
    assert (
        import_cli.main(
            [
                "--input",
                str(tmp_path / "wide.npy"),
                "--dtype",
                "uint16",
                "--tokenizer",
                tok_path,
                "--output-prefix",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_a_big_endian_npy_is_named_as_such_with_the_fix(tmp_path, tok_path, dtype):
    np.save(tmp_path / "be.npy", np.array([5, 6, 1], dtype=np.dtype(dtype).newbyteorder(">")))
    swapped = np.dtype(dtype).newbyteorder("<").str
    with pytest.raises(
        UserError,
        match=rf"be.npy holds big-endian {dtype} ids \(its .npy header says '>u\d'\); token "
        rf"files are little-endian: re-save it with "
        rf"numpy.save\(path, array.astype\('{swapped}'\)\)",
    ):
        import_tokens([str(tmp_path / "be.npy")], dtype, tok_path, str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def test_int32_ids_viewed_as_uint16_are_caught_by_the_integrity_check(
    tmp_path, tok_path, documents
):
    viewed = np.concatenate([np.array(d, dtype=np.int32) for d in documents]).view(np.uint16)
    np.save(tmp_path / "viewed.npy", viewed)  # a header that says uint16, over int32 data
    viewed.tofile(tmp_path / "raw.bin")
    for name in ("viewed.npy", "raw.bin"):
        with pytest.raises(
            UserError, match=r"the int32/uint16 mix-up\): 100% of the odd positions"
        ):
            import_tokens([str(tmp_path / name)], "uint16", tok_path, str(tmp_path / "out"))
        assert not list(tmp_path.glob("out*"))

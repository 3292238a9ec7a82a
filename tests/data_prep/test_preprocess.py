"""Tests for the offline data preparation tools (data_prep)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from data_prep import demo_corpus, inspect as inspect_cli, preprocess as preprocess_cli
from data_prep import tokenizer as tokenizer_cli
from data_prep.bench import run_bench
from data_prep.indexed import IndexedWriter, read_index, read_tokens, token_dtype
from data_prep.integrity import parity_zeros, verify_dataset
from data_prep.manifest import (
    InputRecord,
    Manifest,
    SplitRecord,
    TokenizerRecord,
    manifest_path,
    read_manifest,
    write_manifest,
)
from data_prep.preprocess import preprocess, valid_mask
from data_prep.readers import ReaderOptions
from data_prep.tokenizer import load_tokenizer, train_tokenizer
from lws_megatron.errors import UserError

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, trailing tabs\t\t",
    "Line one\nline two\n\nafter a blank line",
    "Unicode: é ü ß 日本語 \U0001F600 and a control-looking <eod> text",
    "def f(x):\n    return x ** 2  # code keeps its indentation",
    "Numbers 1234567890 split into digits.",
]


def _training_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))[:300_000] + "\n" + "\n".join(DOCS)


def write_jsonl(path: Path, texts, key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "train.txt"
    corpus.write_text(_training_text(), encoding="utf-8")
    return train_tokenizer([str(corpus)], 800, str(root / "tok")).path


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def run(tmp_path: Path, inputs, tok_path: str, name: str = "out", **kwargs) -> tuple[str, Manifest]:
    prefix = str(tmp_path / name)
    kwargs.setdefault("progress", False)
    return prefix, preprocess([str(p) for p in inputs], tok_path, prefix, **kwargs)


def stored_documents(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def make_dataset(tmp_path: Path, docs: list[np.ndarray], vocab_size: int, dtype=None, name="ds") -> str:
    """A dataset with a self-consistent manifest, written without preprocess."""
    prefix = str(tmp_path / name)
    dtype = np.dtype(dtype or token_dtype(vocab_size))
    writer = IndexedWriter(prefix + "_train", dtype)
    writer.add(np.concatenate(docs), np.array([len(d) for d in docs]))
    files = writer.finish()
    writer.commit()
    split = SplitRecord(**dataclasses.asdict(files), prefix="ds_train" if name == "ds" else f"{name}_train")
    write_manifest(
        manifest_path(prefix),
        Manifest(
            tool="test", tool_version="0", created="now",
            tokenizer=TokenizerRecord("tok.model", "0" * 64, vocab_size, 1, 0),
            dtype=dtype.name, append_eod=True, valid_fraction=0.0, split_hash="",
            splits={"train": split}, inputs=[InputRecord("in.jsonl", 1, "0" * 64, len(docs))],
        ),
    )
    return prefix


def rewrite_as_paper_erratum(tmp_path: Path, source: str) -> str:
    """Store a dataset's ids as int32 and read them back as uint16, keeping every record consistent."""
    index = read_index(source + "_train")
    wide = np.asarray(read_tokens(source + "_train", index.dtype)).astype(np.int32).view(np.uint16)
    manifest = read_manifest(manifest_path(source))
    lengths = np.asarray(index.lengths) * 2
    docs = np.split(wide, np.cumsum(lengths)[:-1])
    return make_dataset(tmp_path, docs, manifest.tokenizer.vocab_size, name="erratum")


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic_with_fixed_special_ids(tmp_path, tok_path, tok):
    again = train_tokenizer([str(Path(tok_path).parent / "train.txt")], 800, str(tmp_path / "again"))
    assert Path(again.path).read_bytes() == Path(tok_path).read_bytes()
    assert again.fingerprint == tok.fingerprint == hashlib.sha256(Path(tok_path).read_bytes()).hexdigest()
    assert (tok.pad, tok.eod, tok.bos, tok.unk, tok.vocab_size) == (0, 1, 2, 3, 800)
    assert [tok.processor.id_to_piece(i) for i in range(5)] == ["<pad>", "<eod>", "<bos>", "<unk>", "<0x00>"]
    assert tok.eod not in tok.encode(["text that says <eod> and <pad>"])[0]
    assert all(tok.decode(ids) == doc for ids, doc in zip(tok.encode(DOCS), DOCS))
    assert Path(tok_path).with_suffix(".vocab").read_text(encoding="utf-8").startswith("<pad>\t")


def test_unigram_tokenizer_and_training_errors(tmp_path, tok_path):
    corpus = str(Path(tok_path).parent / "train.txt")
    unigram = train_tokenizer([corpus], 600, str(tmp_path / "uni"), model_type="unigram")
    assert unigram.processor.decode(unigram.processor.encode(DOCS[3])) == DOCS[3]
    with pytest.raises(UserError, match="too high"):
        train_tokenizer([corpus], 500_000, str(tmp_path / "huge"))
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train_tokenizer([corpus], 600, str(tmp_path / "uni"))
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(corpus)
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "missing.model")


# --- preprocess: round trip, dtype, split ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "txt-line", "txt-block"])
def test_round_trip_matches_tokenizer_encoding(tmp_path, tok_path, tok, fmt):
    docs = [d.replace("\n", " ") for d in DOCS] if fmt == "txt-line" else DOCS
    if fmt.startswith("jsonl"):
        source = write_jsonl(tmp_path / "in.jsonl", docs)
        if fmt == "jsonl.gz":
            gz = tmp_path / "in.jsonl.gz"
            gz.write_bytes(gzip.compress(source.read_bytes()))
            source = gz
        options = ReaderOptions()
    else:
        docs = [d.replace("\n\n", "\n") for d in docs] if fmt == "txt-block" else docs
        separator = "\n\n" if fmt == "txt-block" else "\n"
        source = tmp_path / "in.txt"
        source.write_text(separator.join(docs) + "\n", encoding="utf-8")
        options = ReaderOptions(text_docs="block" if fmt == "txt-block" else "line")
    prefix, manifest = run(tmp_path, [source], tok_path, append_eod=True, options=options)

    stored = stored_documents(prefix + "_train")
    assert stored == [ids + [tok.eod] for ids in tok.encode(docs)]
    assert [tok.decode(ids[:-1]) for ids in stored] == docs
    assert manifest.dtype == "uint16" and IndexedDataset(prefix + "_train").index.dtype == np.uint16
    assert manifest.splits["train"].documents == len(docs)
    assert manifest.splits["train"].tokens == sum(map(len, stored))
    assert manifest.tokenizer.sha256 == tok.fingerprint and manifest.tokenizer.eod_id == tok.eod
    assert manifest.inputs[0].sha256 == hashlib.sha256(Path(source).read_bytes()).hexdigest()
    assert manifest.inputs[0].bytes == os.path.getsize(source)
    assert {n for n in os.listdir(tmp_path) if n.startswith("out")} == {
        "out.manifest.json", "out_train.bin", "out_train.idx"
    }
    assert verify_dataset(prefix, tokenizer_fingerprint=tok.fingerprint, full=True) == manifest


def test_token_dtype_at_the_uint16_boundary():
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.int32
    with pytest.raises(UserError):
        token_dtype(0)


@pytest.mark.parametrize("vocab_size, dtype", [(65_536, "uint16"), (65_537, "int32")])
def test_preprocess_dtype_follows_vocabulary_size(tmp_path, tok_path, tok, vocab_size, dtype):
    model = model_pb2.ModelProto()
    model.ParseFromString(Path(tok_path).read_bytes())
    for i in range(vocab_size - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{i}>", 0.0, model_pb2.ModelProto.SentencePiece.UNUSED
    big = tmp_path / "big.model"
    big.write_bytes(model.SerializeToString())
    prefix, manifest = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", DOCS)], str(big))
    assert manifest.dtype == dtype and manifest.tokenizer.vocab_size == vocab_size
    assert IndexedDataset(prefix + "_train").index.dtype == np.dtype(dtype)
    assert stored_documents(prefix + "_train") == tok.encode(DOCS)
    verify_dataset(prefix)


def test_writer_keeps_the_largest_ids_of_each_width(tmp_path):
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
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"megatron{suffix}").read_bytes()


def test_split_is_stable_disjoint_and_independent_of_workers_and_order(tmp_path, tok_path, tok):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    texts = [f"doc {i}: " + " ".join(rng.choice(words, 12)) for i in range(400)]
    a = write_jsonl(tmp_path / "a.jsonl", texts[:200] + [texts[5]])
    b = write_jsonl(tmp_path / "b.jsonl", texts[200:] + [texts[5]])

    def splits(prefix: str) -> dict[str, set[str]]:
        return {s: {tok.decode(ids) for ids in stored_documents(f"{prefix}_{s}")} for s in ("train", "valid")}

    first = splits(run(tmp_path, [a, b], tok_path, "one", workers=1, valid_fraction=0.25)[0])
    second = splits(run(tmp_path, [b, a], tok_path, "two", workers=2, valid_fraction=0.25)[0])
    assert first == second
    assert not first["train"] & first["valid"]
    assert first["train"] | first["valid"] == set(texts)
    assert 60 < len(first["valid"]) < 140
    expected_valid = {t for t, v in zip(texts, valid_mask([t.encode() for t in texts], 0.25)) if v}
    assert first["valid"] == expected_valid


def test_split_hash_is_pinned():
    docs = [f"document {i}".encode() for i in range(12)]
    assert valid_mask(docs, 0.5).tolist() == [
        bool(int.from_bytes(hashlib.blake2b(d, digest_size=8).digest(), "little") < 2**63) for d in docs
    ]
    assert not valid_mask(docs, 0.0).any()


# --- integrity checks ---------------------------------------------------------------------------


@pytest.fixture()
def good_dataset(tmp_path, tok_path) -> str:
    texts = [f"{d} (copy {i})" for i in range(60) for d in DOCS]
    return run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", texts)], tok_path, append_eod=True)[0]


def test_inspect_catches_int32_tokens_read_as_uint16(tmp_path, good_dataset, capsys):
    corrupted = rewrite_as_paper_erratum(tmp_path, good_dataset)
    assert stored_documents(corrupted + "_train")[0][1::2] == [0] * (len(stored_documents(corrupted + "_train")[0]) // 2)
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


def test_uint16_tokens_read_as_int32_are_caught(tmp_path):
    rng = np.random.default_rng(1)
    narrow = rng.integers(1, 60_000, 4000).astype(np.uint16)
    prefix = make_dataset(tmp_path, [narrow.view(np.int32)], 70_000)
    with pytest.raises(UserError, match="two 16-bit ids packed"):
        verify_dataset(prefix)


def test_legitimate_zeros_pass_the_mixup_detector(tmp_path):
    rng = np.random.default_rng(2)
    rare_pad = [np.where(rng.random(n) < 0.01, 0, rng.integers(2, 1000, n)) for n in rng.integers(50, 500, 300)]
    verify_dataset(make_dataset(tmp_path, rare_pad, 1000, name="rare"))
    eod_zero_short_docs = [np.array([rng.integers(1, 1000), 0]) for _ in range(3000)]
    prefix = make_dataset(tmp_path, eod_zero_short_docs, 1000, name="short")
    zeros = parity_zeros(read_tokens(prefix + "_train", np.dtype(np.uint16)), read_index(prefix + "_train"))
    assert zeros.odd == 0.0
    verify_dataset(prefix)


def test_ids_beyond_the_vocabulary_are_caught(tmp_path):
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
    verify_dataset(good_dataset)
    with pytest.raises(UserError, match="differs from the one the manifest recorded"):
        verify_dataset(good_dataset, full=True)
    with pytest.raises(UserError, match="not with the tokenizer given"):
        verify_dataset(good_dataset, tokenizer_fingerprint="f" * 64)
    with pytest.raises(UserError, match="only 10 embeddings"):
        verify_dataset(good_dataset, vocab_size=10)
    manifest = read_manifest(manifest_path(good_dataset))
    split = dataclasses.replace(manifest.splits["train"], idx_sha256="0" * 64)
    write_manifest(manifest_path(good_dataset), dataclasses.replace(manifest, splits={"train": split}))
    with pytest.raises(UserError, match="differs from the one the manifest recorded"):
        verify_dataset(good_dataset + "_train")
    with pytest.raises(UserError, match="has no valid split"):
        verify_dataset(good_dataset + "_valid")
    os.remove(manifest_path(good_dataset))
    with pytest.raises(UserError, match="did not finish"):
        verify_dataset(good_dataset)


def test_inspect_prints_statistics_and_samples(good_dataset, tok_path, capsys):
    assert inspect_cli.main([good_dataset, "--samples", "2", "--tokenizer", tok_path, "--full"]) == 0
    out = capsys.readouterr().out
    assert "360 documents" in out and "uint16" in out and "vocabulary 800" in out
    assert "p50" in out and "The quick brown fox" in out and "checks passed" in out


# --- bad input ---------------------------------------------------------------------------------


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path, tok_path, tok):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "lone \\ud800 surrogate"}\n')
    text = tmp_path / "bad.txt"
    text.write_bytes(b"ok line\nbroken \xc3\x28 pair\n")
    warnings: list[str] = []
    prefix, manifest = run(tmp_path, [jsonl, text], tok_path, warn=warnings.append)
    assert manifest.invalid_utf8 == {"replacements": 3, "documents": 3}
    assert [tok.decode(ids) for ids in stored_documents(prefix + "_train")] == [
        "fine", "bad \ufffd byte", "lone \ufffd surrogate", "ok line", "broken \ufffd( pair",
    ]
    assert any(str(jsonl) in w and "line 2" in w for w in warnings)
    assert any(str(text) in w and "line 2" in w for w in warnings)


def test_empty_documents_are_skipped_and_counted(tmp_path, tok_path):
    jsonl = write_jsonl(tmp_path / "e.jsonl", ["one", "", "  \n\t ", "two"])
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    text = tmp_path / "e.txt"
    text.write_text("three\n\n   \nfour\n", encoding="utf-8")
    prefix, manifest = run(tmp_path, [jsonl, text], tok_path)
    assert manifest.splits["train"].documents == 4
    assert manifest.skipped["empty_documents"] == 4


def test_missing_json_key_is_an_error_or_skipped_on_request(tmp_path, tok_path):
    source = tmp_path / "k.jsonl"
    source.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n{"text": "d"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{source}:3: no key 'text' \(keys: 'body'\).*--skip-missing-key"):
        run(tmp_path, [source], tok_path)
    assert os.listdir(tmp_path) == ["k.jsonl"]
    _, manifest = run(tmp_path, [source], tok_path, options=ReaderOptions(skip_missing_key=True))
    assert manifest.skipped["missing_key"] == 1 and manifest.splits["train"].documents == 3
    _, manifest = run(tmp_path, [source], tok_path, "body", options=ReaderOptions(json_key="body", skip_missing_key=True))
    assert manifest.splits["train"].documents == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\n{"text": \n', r"k.jsonl:2: not valid JSON"),
        (b'{"text": "a"}\n["text"]\n', r"k.jsonl:2: expected a JSON object"),
        (b'{"text": 3}\n', r"k.jsonl:1: 'text' holds int, not a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, tok_path, content, message):
    (tmp_path / "k.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=message):
        run(tmp_path, [tmp_path / "k.jsonl"], tok_path)


def test_gzip_truncated_corrupt_and_multi_member(tmp_path, tok_path):
    whole = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200)))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="cut.jsonl.gz is truncated"):
        run(tmp_path, [truncated], tok_path)
    corrupt = tmp_path / "junk.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match="junk.jsonl.gz is not a valid gzip file"):
        run(tmp_path, [corrupt], tok_path)
    multi = tmp_path / "multi.jsonl.gz"
    multi.write_bytes(whole + gzip.compress(b'{"text": "second member"}\n'))
    _, manifest = run(tmp_path, [multi], tok_path)
    assert manifest.splits["train"].documents == 201


def test_existing_output_is_refused_unless_overwrite(tmp_path, tok_path):
    source = write_jsonl(tmp_path / "in.jsonl", DOCS * 20)
    prefix, first = run(tmp_path, [source], tok_path, valid_fraction=0.3)
    assert set(first.splits) == {"train", "valid"}
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        run(tmp_path, [source], tok_path)
    _, second = run(tmp_path, [source], tok_path, overwrite=True)
    assert set(second.splits) == {"train"}
    assert not os.path.exists(prefix + "_valid.bin") and not os.path.exists(prefix + "_valid.idx")
    verify_dataset(prefix)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, tok_path, monkeypatch):
    monkeypatch.setattr(preprocess_cli, "BATCH_DOCS", 4)
    source = write_jsonl(tmp_path / "in.jsonl", [f"document number {i}" for i in range(40)])
    calls = []

    def interrupt(self, docs, **kwargs):
        calls.append(len(docs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, docs, **kwargs)

    original = preprocess_cli.Tokenizer.encode_arrays
    monkeypatch.setattr(preprocess_cli.Tokenizer, "encode_arrays", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [source], tok_path, valid_fraction=0.5)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_partial_files_are_not_a_dataset(tmp_path):
    writer = IndexedWriter(str(tmp_path / "x_train"), np.dtype(np.uint16))
    writer.add(np.array([5, 6, 7]), np.array([3]))
    writer.finish()
    assert all(name.endswith(".partial") for name in os.listdir(tmp_path))
    with pytest.raises(UserError, match="no manifest"):
        verify_dataset(str(tmp_path / "x"))
    writer.discard()
    assert os.listdir(tmp_path) == []


def test_bad_inputs_and_options_are_refused(tmp_path, tok_path):
    good = write_jsonl(tmp_path / "in.jsonl", DOCS)
    (tmp_path / "in.csv").write_text("a,b\n")
    cases = [
        ([tmp_path / "missing.jsonl"], tok_path, {}, "does not exist"),
        ([str(tmp_path / "*.parquet")], tok_path, {}, "matches no file"),
        ([tmp_path], tok_path, {}, "is a directory"),
        ([tmp_path / "in.csv"], tok_path, {}, "cannot tell the format"),
        ([good], str(tmp_path / "none.model"), {}, "cannot read tokenizer"),
        ([good], tok_path, {"valid_fraction": 1.0}, "outside"),
    ]
    for inputs, tokenizer, kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            run(tmp_path, inputs, tokenizer, **kwargs)
    model = model_pb2.ModelProto()
    model.ParseFromString(Path(tok_path).read_bytes())
    model.trainer_spec.eos_id = -1
    model.pieces[1].type = model_pb2.ModelProto.SentencePiece.UNUSED
    no_eod = tmp_path / "no_eod.model"
    no_eod.write_bytes(model.SerializeToString())
    with pytest.raises(UserError, match="no end-of-document"):
        run(tmp_path, [good], str(no_eod), append_eod=True)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(UserError, match="no documents to write"):
        run(tmp_path, [empty], tok_path)


# --- command lines, demo corpus, bench ----------------------------------------------------------


def test_command_lines_end_to_end(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [_training_text()[i : i + 400] for i in range(0, 200_000, 400)])
    assert tokenizer_cli.main(["train", "--input", str(source), "--vocab-size", "700",
                               "--output", str(tmp_path / "tok")]) == 0
    args = ["--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(tmp_path / "tok.model"),
            "--output-prefix", str(tmp_path / "data" / "demo"), "--append-eod",
            "--valid-fraction", "0.1", "--workers", "2", "--quiet"]
    assert preprocess_cli.main(args) == 0
    assert preprocess_cli.main(args) == 2
    assert inspect_cli.main([str(tmp_path / "data" / "demo_valid")]) == 0
    captured = capsys.readouterr()
    assert "train: " in captured.out and "valid: " in captured.out and "checks passed" in captured.out
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and "--overwrite" in error_lines[0]


def test_demo_corpus_is_offline_deterministic_and_side_effect_free(tmp_path, capsys):
    assert demo_corpus.main(["--output", str(tmp_path / "a")]) == 0
    first = (tmp_path / "a" / demo_corpus.CORPUS_FILE).read_bytes()
    second = Path(demo_corpus.build_demo_corpus(str(tmp_path / "b"))).read_bytes()
    assert first == second and len(first) > 1_000_000
    texts = [json.loads(line)["text"] for line in first.decode("utf-8").splitlines()]
    assert any(t.startswith("Module json\n") for t in texts)
    assert any(t.startswith("Topic ") for t in texts)
    assert "antigravity" not in sys.modules and "tkinter" not in sys.modules
    assert demo_corpus.main(["--output", str(tmp_path / "a")]) == 2


def test_bench_reports_both_rates_and_their_ratio(tmp_path, tok_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", DOCS * 200)
    figures = run_bench([str(source)], tok_path, workers=2, size_mb=0, repeat=1)
    out = capsys.readouterr().out
    assert figures["ratio"] > 0 and "raw encode(docs, num_threads=2)" in out and "ratio" in out

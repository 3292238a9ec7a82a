"""preprocess: round trip, dtype, split, refusals, interruption and the command lines."""

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from data_prep import inspect_dataset as inspect_cli
from data_prep import preprocess as preprocess_cli
from data_prep import tokenizer as tokenizer_cli
from data_prep.dataset_writer import valid_mask
from data_prep.readers import ReaderOptions
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.errors import UserError


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "txt-line", "txt-block"])
def test_round_trip_matches_tokenizer_encoding(
    tmp_path, tok_path, tok, fmt, run, write_jsonl, stored_documents, sample_docs
):
    docs = [d.replace("\n", " ") for d in sample_docs] if fmt == "txt-line" else sample_docs
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
        "out.manifest.json",
        "out_train.bin",
        "out_train.idx",
    }
    assert verify_dataset(prefix, tokenizer_fingerprint=tok.fingerprint) == manifest


@pytest.mark.parametrize("vocab_size, dtype", [(65_536, "uint16"), (65_537, "int32")])
def test_preprocess_dtype_follows_vocabulary_size(
    tmp_path, tok_path, tok, vocab_size, dtype, run, write_jsonl, stored_documents, sample_docs
):
    model = model_pb2.ModelProto()
    model.ParseFromString(Path(tok_path).read_bytes())
    for i in range(vocab_size - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score = f"<unused{i}>", 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.UNUSED
    big = tmp_path / "big.model"
    big.write_bytes(model.SerializeToString())
    prefix, manifest = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", sample_docs)], str(big))
    assert manifest.dtype == dtype and manifest.tokenizer.vocab_size == vocab_size
    assert IndexedDataset(prefix + "_train").index.dtype == np.dtype(dtype)
    assert stored_documents(prefix + "_train") == tok.encode(sample_docs)
    verify_dataset(prefix)


def test_split_is_stable_disjoint_and_independent_of_workers_and_order(
    tmp_path, tok_path, tok, run, write_jsonl, stored_documents
):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    texts = [f"doc {i}: " + " ".join(rng.choice(words, 12)) for i in range(400)]
    a = write_jsonl(tmp_path / "a.jsonl", texts[:200] + [texts[5]])
    b = write_jsonl(tmp_path / "b.jsonl", texts[200:] + [texts[5]])

    def splits(prefix: str) -> dict[str, set[str]]:
        return {
            s: {tok.decode(ids) for ids in stored_documents(f"{prefix}_{s}")}
            for s in ("train", "valid")
        }

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
        bool(int.from_bytes(hashlib.blake2b(d, digest_size=8).digest(), "little") < 2**63)
        for d in docs
    ]
    assert not valid_mask(docs, 0.0).any()


def test_existing_output_is_refused_unless_overwrite(
    tmp_path, tok_path, run, write_jsonl, sample_docs
):
    source = write_jsonl(tmp_path / "in.jsonl", sample_docs * 20)
    prefix, first = run(tmp_path, [source], tok_path, valid_fraction=0.3)
    assert set(first.splits) == {"train", "valid"}
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        run(tmp_path, [source], tok_path)
    _, second = run(tmp_path, [source], tok_path, overwrite=True)
    assert set(second.splits) == {"train"}
    assert not os.path.exists(prefix + "_valid.bin") and not os.path.exists(prefix + "_valid.idx")
    verify_dataset(prefix)


def test_interrupted_run_leaves_nothing_that_looks_complete(
    tmp_path, tok_path, monkeypatch, run, write_jsonl
):
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


def _default_sigint() -> None:
    """A terminal's Ctrl-C, even where the tests run in a background job (whose shell ignores
    SIGINT, which Python would then keep ignoring) or on a thread that blocks it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_on_the_command_line_is_one_line_and_leaves_nothing(
    tmp_path, tok_path, write_jsonl, training_text
):
    lines = [line for line in training_text.splitlines() if line.strip()]
    source = write_jsonl(tmp_path / "in.jsonl", lines * 400)  # seconds of work, not a blink
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.preprocess", "--input", str(source), "--tokenizer"]
        + [tok_path, "--output-prefix", str(out / "data"), "--workers", "1", "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.partial")) and proc.poll() is None:
            assert time.monotonic() < deadline, "preprocess wrote no .partial file in 120 s"
            time.sleep(0.02)
        assert proc.poll() is None, "preprocess finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "interrupted (Ctrl-C)\n")
    assert list(out.iterdir()) == []


def test_bad_inputs_and_options_are_refused(tmp_path, tok_path, run, write_jsonl, sample_docs):
    good = write_jsonl(tmp_path / "in.jsonl", sample_docs)
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


def test_command_lines_end_to_end(tmp_path, capsys, write_jsonl, training_text):
    source = write_jsonl(
        tmp_path / "in.jsonl", [training_text[i : i + 400] for i in range(0, 200_000, 400)]
    )
    assert (
        tokenizer_cli.main(
            [
                "train",
                "--input",
                str(source),
                "--vocab-size",
                "700",
                "--output",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    args = [
        "--input",
        str(tmp_path / "*.jsonl"),
        "--tokenizer",
        str(tmp_path / "tok.model"),
        "--output-prefix",
        str(tmp_path / "data" / "demo"),
        "--append-eod",
        "--valid-fraction",
        "0.1",
        "--workers",
        "2",
        "--quiet",
    ]
    assert preprocess_cli.main(args) == 0
    assert preprocess_cli.main(args) == 2
    assert inspect_cli.main([str(tmp_path / "data" / "demo_valid")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "train: " in out and "valid: " in out and "checks passed" in out
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error: ") and "--overwrite" in error_lines[0]

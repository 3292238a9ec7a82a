"""Hostile inputs and outputs of the data tools: binary files, tokens changed in place, outputs
that cannot be written. Each is one line naming the file, and nothing half-written is left."""

import errno
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import demo_corpus
from data_prep import inspect_dataset as inspect_cli
from data_prep import preprocess as preprocess_cli
from data_prep import tokenizer as tokenizer_cli
from data_prep.tokenizer import train_tokenizer
from lws_megatron import fileio
from lws_megatron.config import load_config
from lws_megatron.dataset import indexed
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.errors import UserError
from lws_megatron.training.data import resolve_sources
from tests.helpers import TINY

ELF_HEAD = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00>\x00\n\n" + bytes(range(256)) * 4


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("prog.txt", ELF_HEAD, r"prog.txt holds NUL bytes in its first 1,046 bytes: binary"),
        ("prog.jsonl", ELF_HEAD, r"prog.jsonl holds NUL bytes"),
        ("prog.txt.gz", gzip.compress(ELF_HEAD), r"prog.txt.gz holds NUL bytes"),
        (
            "noise.txt",
            np.random.default_rng(0).integers(1, 256, 4000, dtype=np.uint8).tobytes(),
            r"noise.txt is not UTF-8 text: [\d,]+ invalid UTF-8 sequences in its first 4,000 bytes",
        ),
        (
            "greek.txt",
            "Ελληνικό κείμενο σε ISO-8859-7\n".encode("iso-8859-7") * 50,
            r"greek.txt is not UTF-8 text: .*convert it to UTF-8",
        ),
    ],
)
def test_binary_input_is_refused_not_indexed(tmp_path, tok_path, run, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        run(tmp_path, [source], tok_path)
    assert "\n" not in str(err.value)
    assert files_under(tmp_path) == [name]
    with pytest.raises(UserError, match=message):
        train_tokenizer([str(source)], 300, str(tmp_path / "tok"))


def test_text_with_a_few_bad_bytes_is_still_repaired(tmp_path, tok_path, run, stored_documents):
    source = tmp_path / "mostly.txt"
    source.write_bytes(b"caf\xe9 au lait\n" + b"plain line of text\n" * 20)
    prefix, manifest = run(tmp_path, [source], tok_path, warn=lambda message: None)
    assert manifest.invalid_utf8 == {"replacements": 1, "documents": 1}
    assert len(stored_documents(prefix + "_train")) == 21


def overwrite_tokens_in_place(prefix: str) -> None:
    """Swap two different ids in the .bin: still valid ids, same sizes, other data."""
    path = Path(prefix + "_train.bin")
    tokens = np.frombuffer(path.read_bytes(), dtype=np.uint16).copy()
    second = int(np.flatnonzero(tokens != tokens[0])[0])
    tokens[[0, second]] = tokens[[second, 0]]
    with open(path, "r+b") as f:
        f.write(tokens.tobytes())


def test_tokens_overwritten_in_place_fail_inspect_and_the_training_check(good_dataset, capsys):
    overwrite_tokens_in_place(good_dataset)
    with pytest.raises(
        UserError,
        match=r"out_train.bin differs from the one the manifest "
        r"recorded \(sha256\): its tokens were changed",
    ):
        verify_dataset(good_dataset, tokenizer_fingerprint=None, vocab_size=800)
    assert inspect_cli.main([good_dataset, "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "out_train.bin differs" in err and err.count("\n") == 1
    assert inspect_cli.main([good_dataset, "--samples", "0", "--skip-bin-hash"]) == 0
    assert "checks passed" in capsys.readouterr().out


def test_training_refuses_tokens_changed_in_place(tmp_path, tiny_data):
    source = Path(tiny_data["prefix"])
    for path in source.parent.glob(source.name + "*"):
        shutil.copy(path, tmp_path / path.name)
    prefix = str(tmp_path / source.name)
    overwrite_tokens_in_place(prefix)
    config = load_config(
        TINY, [f"data.path=[{prefix}]", f"data.tokenizer={tiny_data['tokenizer']}"]
    )
    with pytest.raises(UserError, match=r"data_train.bin differs from the one the manifest"):
        resolve_sources(config)
    # data.verify_hashes=false skips only the hash, for corpora too large to hash at each start
    unhashed = load_config(
        TINY,
        [
            f"data.path=[{prefix}]",
            f"data.tokenizer={tiny_data['tokenizer']}",
            "data.verify_hashes=false",
        ],
    )
    assert resolve_sources(unhashed).prefixes == [prefix]


def test_outputs_under_a_regular_file_are_one_line_errors(
    tmp_path, tok_path, write_jsonl, sample_docs, capsys
):
    source = write_jsonl(tmp_path / "in.jsonl", sample_docs * 20)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a directory\n")
    before = files_under(tmp_path)
    commands = [
        (
            preprocess_cli.main,
            [
                "--input",
                str(source),
                "--tokenizer",
                tok_path,
                "--quiet",
                "--output-prefix",
                str(blocker / "out"),
            ],
            f"{blocker} exists but is not a directory",
        ),
        (
            preprocess_cli.main,
            [
                "--input",
                str(source),
                "--tokenizer",
                tok_path,
                "--quiet",
                "--output-prefix",
                str(blocker / "sub" / "out"),
            ],
            f"{blocker / 'sub'}: Not a directory; a part of that path is a file",
        ),
        (
            tokenizer_cli.main,
            [
                "train",
                "--input",
                str(source),
                "--vocab-size",
                "300",
                "--output",
                str(blocker / "tok"),
            ],
            f"{blocker} exists but is not a directory",
        ),
        (demo_corpus.main, ["--output", str(blocker)], f"{blocker} exists but is not a directory"),
        (
            demo_corpus.main,
            ["--output", str(blocker / "corpus")],
            f"{blocker / 'corpus'}: Not a directory",
        ),
    ]
    for main, argv, message in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert files_under(tmp_path) == before


def test_read_only_output_directory_is_a_one_line_error(
    tmp_path, tok_path, write_jsonl, sample_docs, run
):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
    except PermissionError:
        pass
    else:
        pytest.skip("running as root: chmod 0o500 does not stop writes here")
    source = write_jsonl(tmp_path / "in.jsonl", sample_docs)
    with pytest.raises(UserError, match=f"{locked}/out_train.bin: Permission denied"):
        run(locked, [source], tok_path)
    assert os.listdir(locked) == []


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "failing", ["_train.bin.partial", "_valid.bin.partial", "_train.idx.partial"]
)
def test_full_disk_while_indexing_leaves_no_partial_file(
    tmp_path, tok_path, run, write_jsonl, monkeypatch, failing
):
    monkeypatch.setattr(preprocess_cli, "BATCH_DOCS", 4)
    source = write_jsonl(tmp_path / "in.jsonl", [f"document number {i}" for i in range(80)])
    write = indexed._HashingWriter.write

    def write_until_full(self, data):
        if self.stream.name.endswith(failing) and self.bytes:
            disk_full()
        write(self, data)

    monkeypatch.setattr(indexed._HashingWriter, "write", write_until_full)
    final = failing.removesuffix(".partial")
    with pytest.raises(UserError, match=f"out{final}: No space left on device; free space"):
        run(tmp_path, [source], tok_path, valid_fraction=0.5)
    assert files_under(tmp_path) == ["in.jsonl"]


def test_full_disk_while_writing_the_tokenizer_or_corpus_leaves_no_partial(
    tmp_path, training_text, monkeypatch
):
    corpus = tmp_path / "train.txt"
    corpus.write_text(training_text[:50_000], encoding="utf-8")
    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(UserError, match=f"{tmp_path / 'tok.model'}: No space left on device"):
        train_tokenizer([str(corpus)], 500, str(tmp_path / "tok"))
    monkeypatch.setattr(demo_corpus.json, "dumps", disk_full)
    with pytest.raises(UserError, match=f"{tmp_path / 'demo' / 'pydocs.jsonl'}: No space left"):
        demo_corpus.build_demo_corpus(str(tmp_path / "demo"))
    assert files_under(tmp_path) == ["demo", "train.txt"]

"""Shared fixtures of the data_prep tests: sample documents, a trained tokenizer, datasets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.preprocess import preprocess
from data_prep.tokenizer import train_tokenizer
from lws_megatron.dataset.indexed import IndexedWriter, token_dtype
from lws_megatron.dataset.manifest import (
    InputRecord,
    Manifest,
    SplitRecord,
    TokenizerRecord,
    manifest_path,
    write_manifest,
)
from lws_megatron.dataset.tokenizer import load_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, trailing tabs\t\t",
    "Line one\nline two\n\nafter a blank line",
    "Unicode: é ü ß 日本語 \U0001f600 and a control-looking <eod> text",
    "def f(x):\n    return x ** 2  # code keeps its indentation",
    "Numbers 1234567890 split into digits.",
]


@pytest.fixture(scope="session")
def sample_docs() -> list[str]:
    """Documents that exercise whitespace, blank lines, Unicode, code and digits."""
    return list(DOCS)


@pytest.fixture(scope="session")
def training_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))[:300_000] + "\n" + "\n".join(DOCS)


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[..., Path]:
    def write(path: Path, texts, key: str = "text") -> Path:
        path.write_text(
            "".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts),
            encoding="utf-8",
        )
        return path

    return write


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory, training_text) -> str:
    """An 800-piece BPE tokenizer, trained once per test session."""
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "train.txt"
    corpus.write_text(training_text, encoding="utf-8")
    return train_tokenizer([str(corpus)], 800, str(root / "tok")).path


@pytest.fixture(scope="session")
def tok(tok_path):
    return load_tokenizer(tok_path)


@pytest.fixture(scope="session")
def run() -> Callable[..., tuple[str, Manifest]]:
    """preprocess(inputs) into tmp_path/name, quietly; returns (prefix, manifest)."""

    def run_preprocess(
        tmp_path: Path, inputs, tok_path: str, name: str = "out", **kwargs
    ) -> tuple[str, Manifest]:
        prefix = str(tmp_path / name)
        kwargs.setdefault("progress", False)
        return prefix, preprocess([str(p) for p in inputs], tok_path, prefix, **kwargs)

    return run_preprocess


@pytest.fixture(scope="session")
def stored_documents() -> Callable[[str], list[list[int]]]:
    """The documents of a split as Megatron's own IndexedDataset reads them."""

    def read(prefix: str) -> list[list[int]]:
        dataset = IndexedDataset(prefix)
        return [dataset[i].tolist() for i in range(len(dataset))]

    return read


@pytest.fixture(scope="session")
def make_dataset() -> Callable[..., str]:
    """A dataset with a self-consistent manifest, written without preprocess."""

    def make(tmp_path: Path, docs: list[np.ndarray], vocab_size: int, dtype=None, name="ds") -> str:
        prefix = str(tmp_path / name)
        dtype = np.dtype(dtype or token_dtype(vocab_size))
        writer = IndexedWriter(prefix + "_train", dtype)
        writer.add(np.concatenate(docs), np.array([len(d) for d in docs]))
        files = writer.finish()
        writer.commit()
        split = SplitRecord(**dataclasses.asdict(files), prefix=f"{name}_train")
        write_manifest(
            manifest_path(prefix),
            Manifest(
                tool="test",
                tool_version="0",
                created="now",
                tokenizer=TokenizerRecord("tok.model", "0" * 64, vocab_size, 1, 0),
                dtype=dtype.name,
                append_eod=True,
                valid_fraction=0.0,
                split_hash="",
                splits={"train": split},
                inputs=[InputRecord("in.jsonl", 1, "0" * 64, len(docs))],
            ),
        )
        return prefix

    return make


@pytest.fixture()
def good_dataset(tmp_path, tok_path, run, write_jsonl) -> str:
    texts = [f"{d} (copy {i})" for i in range(60) for d in DOCS]
    return run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", texts)], tok_path, append_eod=True)[0]

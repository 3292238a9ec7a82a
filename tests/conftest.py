"""Shared fixtures: a tiny tokenized corpus built offline with data_prep, once per session."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """{"prefix", "tokenizer"}: the demo corpus indexed with a 512-token tokenizer."""
    from data_prep import demo_corpus, preprocess, tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    assert demo_corpus.main(["--output", str(root / "corpus")]) == 0
    corpus = sorted(str(p) for p in (root / "corpus").glob("*.jsonl"))
    assert tokenizer.main(["train", "--input", *corpus, "--vocab-size", "512",
                           "--output", str(root / "tok")]) == 0
    assert preprocess.main(["--input", *corpus, "--tokenizer", str(root / "tok.model"),
                            "--output-prefix", str(root / "data"), "--append-eod",
                            "--valid-fraction", "0.05", "--quiet"]) == 0
    return {"prefix": str(root / "data"), "tokenizer": str(root / "tok.model")}

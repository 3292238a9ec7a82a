"""Shared fixtures (a tiny tokenized corpus built offline with data_prep, once per session) and
the markers that fixtures imply.

Markers (registered in pyproject.toml): `slow` (a training run, a compile, a cluster: `pytest -m
"not slow"` is the quick loop), `distributed` (several real processes), `slurm` (a private
one-node SLURM cluster), `gpu` (needs CUDA). `.ci/run` runs everything.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds ops under a file lock in $TORCH_EXTENSIONS_DIR (by default machine-wide,
# where another job's killed build stalls every process): the tests use one of this venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
_IMPLIED = {
    "slurm_cluster": ("slurm", "slow", "distributed"),
    "two_proc": ("distributed", "slow"),
    "single_rank": ("distributed",),
    "reference": ("distributed", "slow"),
}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in item.fixturenames:
            for marker in _IMPLIED.get(fixture, ()):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """{"prefix", "tokenizer"}: the demo corpus indexed with a 512-token tokenizer."""
    from data_prep import demo_corpus, preprocess, tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    assert demo_corpus.main(["--output", str(root / "corpus")]) == 0
    corpus = sorted(str(p) for p in (root / "corpus").glob("*.jsonl"))
    assert (
        tokenizer.main(
            ["train", "--input", *corpus, "--vocab-size", "512", "--output", str(root / "tok")]
        )
        == 0
    )
    assert (
        preprocess.main(
            [
                "--input",
                *corpus,
                "--tokenizer",
                str(root / "tok.model"),
                "--output-prefix",
                str(root / "data"),
                "--append-eod",
                "--valid-fraction",
                "0.05",
                "--quiet",
            ]
        )
        == 0
    )
    return {"prefix": str(root / "data"), "tokenizer": str(root / "tok.model")}

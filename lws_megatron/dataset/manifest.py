"""PREFIX.manifest.json: what a tokenized dataset holds and how it was made.

The manifest is written last, after the .bin/.idx files are in place, so its presence marks a
complete run; readers check the files against it (see lws_megatron.dataset.integrity). Names:

    PREFIX.manifest.json               this record
    PREFIX_train.bin / PREFIX_train.idx  the training split (a Megatron indexed dataset)
    PREFIX_valid.bin / PREFIX_valid.idx  the validation split, when --valid-fraction > 0
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lws_megatron.dataset.indexed import WrittenFiles
from lws_megatron.errors import UserError
from lws_megatron.fileio import write_bytes_atomic

MANIFEST_SUFFIX = ".manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")


def manifest_path(prefix: str) -> str:
    return prefix + MANIFEST_SUFFIX


def split_prefix(prefix: str, split: str) -> str:
    """The Megatron path prefix of one split: PREFIX_train or PREFIX_valid."""
    return f"{prefix}_{split}"


@dataclass(frozen=True)
class TokenizerRecord:
    path: str
    sha256: str
    vocab_size: int
    eod_id: int | None
    pad_id: int | None


@dataclass(frozen=True)
class SplitRecord(WrittenFiles):
    """One .bin/.idx pair as written; `prefix` is relative to the manifest's directory."""

    prefix: str


@dataclass(frozen=True)
class InputRecord:
    path: str
    bytes: int
    sha256: str
    documents: int


@dataclass(frozen=True)
class Manifest:
    tool: str
    tool_version: str
    created: str
    tokenizer: TokenizerRecord
    dtype: str
    append_eod: bool
    valid_fraction: float
    split_hash: str
    splits: dict[str, SplitRecord]
    inputs: list[InputRecord]
    skipped: dict[str, int] = field(default_factory=dict)
    invalid_utf8: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())


def write_manifest(path: str, manifest: Manifest) -> None:
    write_bytes_atomic(path, (json.dumps(asdict(manifest), indent=2) + "\n").encode("utf-8"))


def read_manifest(path: str) -> Manifest:
    """Load a manifest, refusing files that are missing, unreadable or of another format."""
    if not os.path.isfile(path):
        raise UserError(
            f"manifest {path} does not exist: the dataset was not made by data_prep.preprocess "
            "or its run did not finish; re-run python -m data_prep.preprocess"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return _from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{path} is not a valid data_prep manifest ({type(err).__name__}: {err}); "
            "re-run python -m data_prep.preprocess"
        ) from None


def _from_dict(data: dict[str, Any]) -> Manifest:
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"format_version {data['format_version']}, this tool reads {FORMAT_VERSION}"
        )
    return Manifest(
        **{
            **data,
            "tokenizer": TokenizerRecord(**data["tokenizer"]),
            "splits": {name: SplitRecord(**record) for name, record in data["splits"].items()},
            "inputs": [InputRecord(**record) for record in data["inputs"]],
        }
    )

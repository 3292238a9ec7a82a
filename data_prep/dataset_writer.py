"""Writing one dataset as a transaction, for every tool that makes one (preprocess,
import_tokens): a writer per split under .partial names, all discarded if anything fails; a
split no document fell into left out; then the files renamed into place and the manifest last,
so an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Iterator, Sequence

import numpy as np

from lws_megatron.dataset.indexed import IndexedWriter, WrittenFiles, get_bin_path, get_idx_path
from lws_megatron.dataset.manifest import (
    SPLITS,
    Manifest,
    SplitRecord,
    TokenizerRecord,
    manifest_path,
    split_prefix,
    write_manifest,
)
from lws_megatron.dataset.tokenizer import Tokenizer
from lws_megatron.errors import UserError
from lws_megatron.fileio import remove_quietly


def valid_mask(docs: Sequence[bytes], fraction: float) -> np.ndarray:
    """Which documents belong to the validation split; a pure function of each document."""
    if fraction <= 0:
        return np.zeros(len(docs), dtype=bool)
    digests = b"".join(hashlib.blake2b(doc, digest_size=8).digest() for doc in docs)
    threshold = min(int(fraction * 2**64), 2**64 - 1)
    return np.frombuffer(digests, dtype="<u8") < np.uint64(threshold)


def output_paths(prefix: str) -> list[str]:
    """Every file a run at PREFIX may write, whichever splits it makes."""
    return [manifest_path(prefix)] + [
        path for split in SPLITS for path in _split_files(split_prefix(prefix, split))
    ]


@contextlib.contextmanager
def split_writers(
    prefix: str, dtype: np.dtype, valid_fraction: float
) -> Iterator[dict[str, IndexedWriter]]:
    """A writer per split (valid only for a fraction above 0); all discarded if the body raises."""
    writers: dict[str, IndexedWriter] = {}
    try:
        for split in SPLITS if valid_fraction > 0 else SPLITS[:1]:
            writers[split] = IndexedWriter(split_prefix(prefix, split), dtype)
        yield writers
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise


def refuse_no_documents(
    writers: dict[str, IndexedWriter], written: dict[str, WrittenFiles], why: str
) -> None:
    """Discard everything and raise `why` when the train split got no document."""
    if written["train"].documents == 0:
        for writer in writers.values():
            writer.discard()
        raise UserError(why)


def drop_empty_valid(writers: dict[str, IndexedWriter], written: dict[str, WrittenFiles]) -> bool:
    """Leave out a validation split that no document fell into; whether one was."""
    if "valid" not in written or written["valid"].documents:
        return False
    writers.pop("valid").discard()
    del written["valid"]
    return True


def tokenizer_record(tokenizer: Tokenizer, eod_id: int | None) -> TokenizerRecord:
    return TokenizerRecord(
        path=os.path.abspath(tokenizer.path),
        sha256=tokenizer.fingerprint,
        vocab_size=tokenizer.vocab_size,
        eod_id=eod_id,
        pad_id=tokenizer.pad,
    )


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def split_records(prefix: str, written: dict[str, WrittenFiles]) -> dict[str, SplitRecord]:
    return {
        split: SplitRecord(**asdict(files), prefix=os.path.basename(split_prefix(prefix, split)))
        for split, files in written.items()
    }


def commit(prefix: str, writers: dict[str, IndexedWriter], manifest: Manifest) -> None:
    """Rename the finished files into place, drop stale splits of an older run, manifest last."""
    remove_quietly(manifest_path(prefix))
    for writer in writers.values():
        writer.commit()
    for split in SPLITS:
        if split not in writers:
            for path in _split_files(split_prefix(prefix, split)):
                remove_quietly(path)
    write_manifest(manifest_path(prefix), manifest)


def _split_files(prefix: str) -> tuple[str, str]:
    return get_bin_path(prefix), get_idx_path(prefix)

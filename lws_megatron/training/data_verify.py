"""The corpus is verified once per version of its files, and that work is shared by the ranks.

data_prep's full check (`integrity.verify_dataset`: every id read, every .bin hashed against
its manifest) reads the whole corpus, 2 TB at a trillion uint16 tokens. A split that passes it
leaves a stamp in `run.dir/data_cache/verified/`: the manifest's sha256 and the size,
modification time, inode and status-change time of its .bin and .idx. A later start whose files
still match checks nothing more; a file written since (edited, replaced, re-prepared, even with
its old mtime put back, which sets the status-change time) or a new manifest is checked in full
again, as is everything under another tokenizer or vocabulary. The splits to
check are dealt out over every rank of the job, each read whole by one rank (its sha256 is one
sequential pass); a failure anywhere stops every rank with its line.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from lws_megatron.config import Config
from lws_megatron.dataset.indexed import get_bin_path, get_idx_path
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.dataset.manifest import manifest_path, read_manifest, split_prefix
from lws_megatron.fileio import ensure_dir, os_errors, sha256_file, write_json_atomic
from lws_megatron.training.distributed import agreed


def verify_sources(config: Config, prefixes: list[str], tokenizer, cache_dir: Path) -> list[str]:
    """Collective: every split of every dataset checked, or stamped as checked; returns the
    splits this rank checked in full."""
    splits = [
        split_prefix(prefix, name)
        for prefix in prefixes
        for name in sorted(read_manifest(manifest_path(prefix)).splits)
    ]
    stamps = cache_dir / "verified"
    hash_bin = config.data.verify_hashes
    decided = [None]
    if dist.get_rank() == 0:  # rank 0 decides for all: a stamp may appear meanwhile
        vocab = config.model.vocab_size
        decided = [[s for s in splits if not _stamped(stamps, s, tokenizer, vocab, hash_bin)]]
    dist.broadcast_object_list(decided, src=0)
    mine = decided[0][dist.get_rank() :: dist.get_world_size()]

    def check() -> None:
        for split in mine:
            before = _record(split)  # a file changed while it is read is checked again next time
            verify_dataset(
                split,
                tokenizer_fingerprint=tokenizer.fingerprint,
                tokenizer_path=config.data.tokenizer,
                vocab_size=config.model.vocab_size,
                hash_bin=hash_bin,
            )
            _stamp(stamps, split, tokenizer, config.model.vocab_size, hash_bin, before)

    agreed(check)
    return mine


def _key(split: str, tokenizer, vocab_size: int) -> str:
    parts = [os.path.abspath(split), tokenizer.fingerprint, str(vocab_size)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _files(split: str) -> dict[str, list[int]]:
    """[bytes, mtime_ns, inode, ctime_ns] of the split's .bin and .idx: ctime is the kernel's,
    which no user can set back."""
    found = {}
    for path in (get_bin_path(split), get_idx_path(split)):
        stat = os.stat(path)
        found[os.path.basename(path)] = [
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ino,
            stat.st_ctime_ns,
        ]
    return found


def _manifest_of(split: str) -> str:
    return manifest_path(split.rsplit("_", 1)[0])


def _record(split: str) -> dict:
    return {"manifest_sha256": sha256_file(_manifest_of(split)), "files": _files(split)}


def _stamped(stamps: Path, split: str, tokenizer, vocab_size: int, hash_bin: bool) -> bool:
    path = stamps / f"{_key(split, tokenizer, vocab_size)}.json"
    try:
        stamp = json.loads(path.read_text())
        current = _record(split)
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or (hash_bin and not stamp.get("hashed")):
        return False
    return all(stamp.get(k) == v for k, v in current.items())


def _stamp(
    stamps: Path, split: str, tokenizer, vocab_size: int, hash_bin: bool, record: dict
) -> None:
    ensure_dir(stamps)
    with os_errors(stamps):
        write_json_atomic(
            stamps / f"{_key(split, tokenizer, vocab_size)}.json",
            {
                "split": os.path.abspath(split),
                **record,
                "hashed": hash_bin,
                "verified": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )

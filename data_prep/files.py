"""File helpers shared by the data tools: atomic outputs, hashing, refusing to clobber."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from lws_megatron.errors import UserError

PARTIAL_SUFFIX = ".partial"
_HASH_BLOCK = 1 << 22


def partial_path(path: str | os.PathLike) -> str:
    """Where an output is written before it is complete; never mistaken for a finished file."""
    return os.fspath(path) + PARTIAL_SUFFIX


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path; rename it to `path` only if the block finishes without error."""
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a small file so that readers see either the old content or the whole new one."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def remove_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool, what: str) -> None:
    """Stop before any work if an output already exists, unless the user asked to replace it."""
    if overwrite:
        return
    existing = [os.fspath(p) for p in paths if os.path.exists(p)]
    if existing:
        raise UserError(
            f"{what} already exists: {', '.join(existing)}; "
            "pass --overwrite to replace it or choose another output"
        )


def ensure_parent(path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)

"""Files that are never half-written, and OS failures as one-line errors.

Every output of the project goes through `atomic_output`: written beside its final name, then
renamed, so a reader (or a crash) sees either the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from lws_megatron.errors import UserError

PARTIAL_SUFFIX = ".partial"
_HASH_BLOCK = 1 << 22
_BAR_BYTES = 1 << 30


def partial_path(path: str | os.PathLike) -> str:
    """Where an output is written before it is complete; never mistaken for a finished file."""
    return os.fspath(path) + PARTIAL_SUFFIX


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path; rename it to `path` only if the block finishes without error."""
    tmp = partial_path(path)
    try:
        with os_errors(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a small file durably: readers see the old content or the whole new one."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def remove_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.remove(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256; a file of a GB or more shows a progress bar on a terminal."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    bar = None
    if size >= _BAR_BYTES:
        from tqdm import tqdm

        name = os.path.basename(path)
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {name}", disable=None)
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()
    return digest.hexdigest()


_FIXES = {
    errno.ENOSPC: "free space there or write elsewhere",
    errno.EDQUOT: "free space in your quota or write elsewhere",
    errno.EFBIG: "the file outgrew a file-size limit (ulimit -f, or the filesystem's); "
    "raise it or write elsewhere",
    errno.EROFS: "the filesystem is read-only; write elsewhere",
    errno.EACCES: "you may not write there; fix its permissions or write elsewhere",
    errno.EPERM: "you may not write there; fix its permissions or write elsewhere",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errno.EISDIR: "name a file, not a directory",
}


@contextlib.contextmanager
def os_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only filesystem or a permission error under `path` into a
    UserError that names the path and the fix (other OSErrors are bugs and keep their trace)."""
    try:
        yield
    except OSError as err:
        line = os_error_line(err, path)
        if line is None:
            raise
        raise UserError(line) from None


def os_error_line(err: OSError, path: str | os.PathLike) -> str | None:
    """The one-line message of a full disk, a read-only filesystem or a permission error under
    `path`; None for other OSErrors."""
    if err.errno not in _FIXES:
        return None
    # the user's name for the file: a rename's target, never our .partial name
    where = os.fspath(err.filename2 or err.filename or path).removesuffix(PARTIAL_SUFFIX)
    return f"{where}: {os.strerror(err.errno)}; {_FIXES[err.errno]}"


def ensure_dir(path: str | os.PathLike) -> Path:
    with os_errors(path):
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(
                f"{os.fspath(path)} exists but is not a directory; "
                "move it away or choose another path"
            ) from None
    return Path(path)

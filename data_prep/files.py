"""File helpers of the data tools: refusing to clobber outputs (atomic writes live in
lws_megatron.fileio)."""

from __future__ import annotations

import os
from typing import Iterable

from lws_megatron.errors import UserError
from lws_megatron.fileio import ensure_dir


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
    ensure_dir(os.path.dirname(os.path.abspath(path)))

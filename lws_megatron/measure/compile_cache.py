"""Compiled kernels carried from one process (or machine) to the next.

torch.compiler's portable cache holds what a process compiled (Inductor's graphs with their
Triton kernels, AOT autograd's): loaded before compiling, the same graphs skip code
generation and kernel builds. Dynamo still traces. Packed for a trip off a device machine as
xz parts of at most `PART_BYTES` each (`compile_cache.0.xz`, ...), since such a machine hands
back a few files of bounded size.
"""

from __future__ import annotations

import lzma
from pathlib import Path

from lws_megatron.fileio import ensure_dir, remove_quietly, write_bytes_atomic

PART_BYTES = 15 * 2**20
PART_GLOB = "compile_cache.*.xz"


def load_compile_cache(path: Path) -> bool:
    """Load the kernels of an earlier process: a file of torch's format, or a folder of
    packed parts (what `pack` writes). False if there was nothing to load."""
    data = unpack(path) if path.is_dir() else path.read_bytes() if path.is_file() else None
    if not data:
        return False
    import torch  # packing needs none: the measurement's supervisor runs without torch

    return torch.compiler.load_cache_artifacts(data) is not None


def save_compile_cache(path: Path) -> None:
    """What this process compiled, or loaded and used, for the next process to skip compiling."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        ensure_dir(path.parent)
        write_bytes_atomic(path, saved[0])


def pack(data: bytes, folder: Path, max_parts: int) -> list[Path]:
    """`data` compressed into `folder` as parts of at most PART_BYTES; none if that takes more
    than `max_parts` parts. Older parts there are removed first."""
    for old in folder.glob(PART_GLOB):
        remove_quietly(old)
    packed = lzma.compress(data, preset=1)
    parts = [packed[i : i + PART_BYTES] for i in range(0, len(packed), PART_BYTES)]
    if len(parts) > max_parts:
        return []
    paths = [folder / f"compile_cache.{i}.xz" for i in range(len(parts))]
    for path, part in zip(paths, parts):
        write_bytes_atomic(path, part)
    return paths


def unpack(folder: Path) -> bytes | None:
    """The bytes `pack` wrote into `folder`; None if it holds no parts."""
    parts = sorted(folder.glob(PART_GLOB), key=lambda p: int(p.name.split(".")[1]))
    if not parts:
        return None
    return lzma.decompress(b"".join(p.read_bytes() for p in parts))

"""The torch_dist checkpoint format: each tensor under its global name and shape, each rank's
slices in a file of its own, read back at any layout.

It is what Megatron-Core's `dist_checkpointing` writes with its torch_dist backend: PyTorch
Distributed Checkpoint (DCP) files, `__{rank}_0.distcp` holding one `torch.save`d tensor per
slice and `.metadata` (DCP's pickled `Metadata`) naming the file, offset and length of every
slice of every tensor, beside Megatron's `metadata.json` and `common.pt`. Megatron's and DCP's
loaders read these directories. Ours differ from theirs in what they trust:
- a file's sha256 is computed by the rank that writes it, as it writes it (`write_slices`);
- `.metadata` is rebuilt by an unpickler that knows DCP's metadata classes and nothing else,
  every tensor and `common.pt` load with `torch.load(weights_only=True)`, and nothing else is
  ever unpickled (DCP and Megatron unpickle `.metadata` and non-tensor objects freely);
- a rank reads only the files holding the slices it asks for (`plan_reads`), and so verifies
  only those.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from lws_megatron.errors import UserError

METADATA = ".metadata"
COMMON = "common.pt"
MEGATRON_CONFIG = "metadata.json"
# Megatron-Core's metadata.json: what `dist_checkpointing.load` checks a directory by.
MEGATRON_BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def data_file(rank: int) -> str:
    return f"__{rank}_0.distcp"


@dataclass
class Slice:
    """A box of the global tensor `key` that this rank holds (or wants); `tensor` has its shape."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    tensor: torch.Tensor

    @classmethod
    def of(cls, sharded: ShardedTensor) -> Slice:
        lead = (1,) * sharded.prepend_axis_num
        return cls(
            sharded.key,
            tuple(sharded.global_shape),
            tuple(sharded.global_offset),
            sharded.data.view(lead + tuple(sharded.local_shape)),
        )

    @property
    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(torch.Size(self.offset), self.tensor.shape)


@dataclass
class Written:
    """What one rank wrote: each file's size and sha256, and where in it each slice lies as
    (key, global shape, dtype, offset, sizes, file, start, length)."""

    files: dict[str, dict[str, Any]]
    slices: list[tuple]


class _HashingWriter:
    """A write-only stream onto a file descriptor that hashes what passes through it, keeping
    the first OSError of its writes (torch.save reports one as a RuntimeError that has lost
    the cause)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.digest, self.written = fd, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.written += len(view)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            self.error = self.error or err
            raise
        return len(data)

    def flush(self) -> None:
        pass


def write_file(path: Path, write) -> dict[str, Any]:
    """Call `write(stream)` on a new file at `path`, fsync it; its size and sha256, hashed from
    the bytes as they were written. A failed write (a full disk, a quota, a file-size limit)
    is raised as the OSError it is, naming the file."""
    stream = _HashingWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    try:
        write(stream)
        os.fsync(stream.fd)
    except (RuntimeError, OSError) as err:
        cause = stream.error or (err if isinstance(err, OSError) else None)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, os.fspath(path)) from None
    finally:
        os.close(stream.fd)
    return {"bytes": stream.written, "sha256": stream.digest.hexdigest()}


def write_slices(root: Path, rel: str, slices: list[Slice]) -> Written:
    """Every slice into `root/rel`, one `torch.save` each (DCP's layout). The tensors must be
    compact host copies: torch.save writes a view's whole storage."""
    where = []

    def write(stream: _HashingWriter) -> None:
        for s in slices:
            start = stream.written
            torch.save(s.tensor, stream)
            dtype = str(s.tensor.dtype).removeprefix("torch.")
            sizes = tuple(s.tensor.shape)
            where.append(
                (s.key, s.global_shape, dtype, s.offset, sizes, rel, start, stream.written - start)
            )

    record = write_file(root / rel, write)
    return Written({rel: record}, where)


def build_metadata(written: list[Written]) -> Metadata:
    """DCP's metadata of every rank's slices; refuses a tensor they do not cover exactly once."""
    tensors: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for part in written:
        for key, shape, dtype, offset, sizes, rel, start, length in part.slices:
            md = tensors.setdefault(
                key,
                TensorStorageMetadata(
                    TensorProperties(dtype=getattr(torch, dtype)), torch.Size(shape), []
                ),
            )
            if tuple(md.size) != tuple(shape) or md.properties.dtype != getattr(torch, dtype):
                raise RuntimeError(f"{key}: ranks disagree on its shape or dtype")
            md.chunks.append(ChunkStorageMetadata(torch.Size(offset), torch.Size(sizes)))
            storage[MetadataIndex(key, torch.Size(offset))] = _StorageInfo(rel, start, length)
    for key, md in tensors.items():
        _check_cover(key, md)
    return Metadata(state_dict_metadata=tensors, storage_data=storage)


def _check_cover(key: str, md: TensorStorageMetadata) -> None:
    """Each element saved exactly once: distinct boxes inside the tensor whose sizes add up."""
    offsets = {tuple(c.offsets) for c in md.chunks}
    inside = all(o + s <= n for c in md.chunks for o, s, n in zip(c.offsets, c.sizes, md.size))
    volume = sum(math.prod(c.sizes) for c in md.chunks)
    if len(offsets) != len(md.chunks) or not inside or volume != math.prod(md.size):
        raise RuntimeError(
            f"{key}: the ranks' slices cover {volume} of its {math.prod(md.size)} elements "
            f"({len(md.chunks)} slices, {len(offsets)} distinct)"
        )


def write_metadata(root: Path, metadata: Metadata) -> dict[str, dict[str, Any]]:
    """`.metadata` (pickled, as DCP writes it) and Megatron's `metadata.json`, with their hashes."""
    import json

    return {
        METADATA: write_file(root / METADATA, lambda s: pickle.dump(metadata, s)),
        MEGATRON_CONFIG: write_file(
            root / MEGATRON_CONFIG, lambda s: s.write(json.dumps(MEGATRON_BACKEND).encode())
        ),
    }


# What DCP's metadata pickle is made of; anything else in a `.metadata` is refused.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, no checkpoint metadata")


def read_metadata(path: Path) -> Metadata:
    """A checkpoint's `.metadata`, rebuilt from DCP's metadata classes only."""
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as err:
        raise refused(path, str(err)) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise UserError(f"{path} is not checkpoint metadata ({err}); it is damaged") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UserError(f"{path} is not checkpoint metadata; it is damaged")
    return metadata


def refused(path: Path | str, reason: str) -> UserError:
    return UserError(
        f"{path}: refused to load: it holds objects that could run code ({reason}); move its "
        "checkpoint aside to resume from an earlier one, or start a new run.dir"
    )


def _unpickling_reason(err: Exception) -> str:
    """What the file asked for, without PyTorch's advice (to load it unsafely, or to allow
    the object), which a user of a crafted file must not follow."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"it asks for {found.group(1)}, which is neither a tensor nor a number"
    return "not only tensors and numbers"


def safe_load(source: Path | bytes, name: Path | str | None = None) -> Any:
    """torch.load that rebuilds tensors, numbers and containers only (`weights_only`)."""
    name = name if name is not None else source
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        with warnings.catch_warnings():
            # PyTorch's warning on a crafted file's pickle protocol asks to file an issue
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused(name, _unpickling_reason(err)) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise UserError(
            f"{name} is not a checkpoint file ({str(err)[:120]}); it is damaged"
        ) from None


Plan = dict[str, dict[MetadataIndex, list[tuple[Any, Slice]]]]


def plan_reads(metadata: Metadata, wanted: list[Slice], where: Path) -> Plan:
    """For each file, the saved slices that overlap `wanted` and the parts to copy from them."""
    plan: Plan = {}
    for s in wanted:
        md = metadata.state_dict_metadata.get(s.key)
        if not isinstance(md, TensorStorageMetadata):
            raise UserError(f"{where} has no tensor {s.key}; it was saved by another model")
        if tuple(md.size) != s.global_shape:
            raise UserError(
                f"{where}: {s.key} has shape {list(md.size)} there and "
                f"{list(s.global_shape)} in this model; it was saved by another model"
            )
        for item in create_read_items_for_chunk_list(s.key, md, [s.chunk]):
            info = metadata.storage_data[item.storage_index]
            plan.setdefault(info.relative_path, {}).setdefault(item.storage_index, []).append(
                (item, s)
            )
    return plan


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


def read_planned(root: Path, metadata: Metadata, plan: Plan) -> None:
    """Copy every planned part into its slice's tensor (any dtype, any device), each saved
    slice read once."""
    for rel, saved in plan.items():
        path = root / rel
        with open(path, "rb") as file:
            for index, parts in saved.items():
                info = metadata.storage_data[index]
                file.seek(info.offset)
                tensor = safe_load(file.read(info.length), path)
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"{path}: {index.fqn} is not a tensor; it is damaged")
                for item, s in parts:
                    source = _narrow(tensor, item.storage_offsets, item.lengths)
                    _narrow(s.tensor, item.dest_offsets, item.lengths).copy_(source)

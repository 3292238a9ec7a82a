"""Megatron-Core's indexed dataset (.bin/.idx): the token dtype rule, a streaming writer, a
checked reader.

The files are byte for byte those of `megatron.core.datasets.indexed_dataset`, so Megatron-LM,
Megatron-Core and NeMo read them with `IndexedDataset(prefix)`. Its header, dtype codes and file
names are restated here (a test holds them equal to Megatron's) so that data preparation never
imports Megatron-Core or torch. The writer differs from `IndexedDatasetBuilder` only in how it gets
there: it takes whole batches of documents as arrays and keeps the per-document lengths in a
scratch file instead of Python lists, so it is fast and its memory stays flat for any corpus.
Every file is written under a `.partial` name and renamed by `commit()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO

import numpy as np

from lws_megatron.errors import UserError
from lws_megatron.fileio import os_errors, partial_path, remove_quietly

UINT16_VOCAB_LIMIT = 1 << 16
INT32_VOCAB_LIMIT = 1 << 31
_INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
_CHUNK = 1 << 20
_INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron-Core's `DType` codes: the token dtype as the index header records it.
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype for a vocabulary: uint16 while every id fits in 16 bits, int32 beyond."""
    if vocab_size < 1:
        raise UserError(f"vocabulary size {vocab_size} is not positive")
    if vocab_size <= UINT16_VOCAB_LIMIT:
        return np.dtype(np.uint16)
    if vocab_size <= INT32_VOCAB_LIMIT:
        return np.dtype(np.int32)
    raise UserError(f"vocabulary size {vocab_size} does not fit in int32 token ids")


@dataclass(frozen=True)
class WrittenFiles:
    """Sizes and hashes of a finished .bin/.idx pair, for the manifest."""

    documents: int
    tokens: int
    bin_bytes: int
    idx_bytes: int
    bin_sha256: str
    idx_sha256: str


class _HashingWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.stream.write(view)
        self.digest.update(view)
        self.bytes += view.nbytes


class IndexedWriter:
    """Stream documents into one Megatron indexed dataset at `prefix`."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self._lengths_path = partial_path(prefix + ".lengths")
        bin_path = partial_path(get_bin_path(prefix))
        with os_errors(get_bin_path(prefix)), contextlib.ExitStack() as undo:
            self._bin_file = undo.enter_context(open(bin_path, "wb"))
            undo.callback(remove_quietly, bin_path)
            self._lengths = open(self._lengths_path, "w+b")
            undo.pop_all()
        self._bin = _HashingWriter(self._bin_file)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids and their lengths."""
        with os_errors(get_bin_path(self.prefix)):
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype))
            self._lengths.write(np.ascontiguousarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def finish(self) -> WrittenFiles:
        """Close the data file and write the index, both still under their .partial names."""
        with os_errors(get_bin_path(self.prefix)):
            self._bin_file.close()
        idx_path = partial_path(get_idx_path(self.prefix))
        with os_errors(get_idx_path(self.prefix)), open(idx_path, "wb") as stream:
            idx = _HashingWriter(stream)
            self._write_index(idx)
        self._lengths.close()
        remove_quietly(self._lengths_path)
        return WrittenFiles(
            documents=self.documents,
            tokens=self.tokens,
            bin_bytes=self._bin.bytes,
            idx_bytes=idx.bytes,
            bin_sha256=self._bin.digest.hexdigest(),
            idx_sha256=idx.digest.hexdigest(),
        )

    def commit(self) -> None:
        for final in (get_bin_path(self.prefix), get_idx_path(self.prefix)):
            with os_errors(final):
                os.replace(partial_path(final), final)

    def discard(self) -> None:
        """Remove every partial file, also after a failed write (closing may fail again)."""
        for stream in (self._bin_file, self._lengths):
            with contextlib.suppress(OSError):
                stream.close()
        for path in (
            get_bin_path(self.prefix),
            get_idx_path(self.prefix),
            self.prefix + ".lengths",
        ):
            remove_quietly(partial_path(path))

    def _write_index(self, out: _HashingWriter) -> None:
        """Megatron's layout: header, int32 lengths, int64 byte pointers, int64 document indices."""
        count = self.documents
        code = DTYPE_CODES[self.dtype.type]
        out.write(_HEADER.pack(_INDEX_HEADER, _INDEX_VERSION, code, count, count + 1))
        for chunk in self._length_chunks():
            out.write(chunk)
        offset = 0
        for chunk in self._length_chunks():
            ends = np.cumsum(chunk, dtype=np.int64) * self.dtype.itemsize + offset
            out.write(ends - chunk.astype(np.int64) * self.dtype.itemsize)
            offset = int(ends[-1])
        for start in range(0, count + 1, _CHUNK):
            out.write(np.arange(start, min(start + _CHUNK, count + 1), dtype=np.int64))

    def _length_chunks(self):
        self._lengths.flush()
        self._lengths.seek(0)
        while chunk := self._lengths.read(_CHUNK * 4):
            yield np.frombuffer(chunk, dtype=np.int32)


@dataclass(frozen=True)
class IndexFile:
    """The arrays of a .idx file, memory-mapped."""

    path: str
    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray

    @cached_property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def read_index(prefix: str) -> IndexFile:
    """Open PREFIX.idx, refusing anything that is not a complete Megatron index."""
    path = get_idx_path(prefix)
    if not os.path.isfile(path):
        raise UserError(f"index file {path} does not exist; run data_prep.preprocess to create it")
    size = os.path.getsize(path)
    if size < _HEADER.size:
        raise UserError(
            f"{path} is only {size} bytes, too short for a Megatron index; re-run preprocess"
        )
    with open(path, "rb") as f:
        magic, version, code, sequences, documents = _HEADER.unpack(f.read(_HEADER.size))
    if magic != _INDEX_HEADER or version != _INDEX_VERSION:
        raise UserError(
            f"{path} is not a Megatron indexed-dataset index (bad header); re-run preprocess"
        )
    by_code = {c: np.dtype(t) for t, c in DTYPE_CODES.items()}
    if code not in by_code:
        raise UserError(f"{path} names unknown token dtype code {code}; re-run preprocess")
    dtype = by_code[code]
    expected = _HEADER.size + sequences * 12 + documents * 8
    if size != expected:
        raise UserError(
            f"{path} is {size} bytes but its header promises {expected} "
            f"({sequences} sequences): truncated or overwritten; re-run preprocess"
        )
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    start = _HEADER.size
    lengths = buf[start : start + 4 * sequences].view(np.int32)
    start += 4 * sequences
    pointers = buf[start : start + 8 * sequences].view(np.int64)
    start += 8 * sequences
    document_indices = buf[start : start + 8 * documents].view(np.int64)
    return IndexFile(path, dtype, lengths, pointers, document_indices)


def read_tokens(prefix: str, dtype: np.dtype) -> np.ndarray:
    """Memory-map PREFIX.bin as a flat array of token ids."""
    path = get_bin_path(prefix)
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist; run data_prep.preprocess to create it")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise UserError(
            f"{path} is {size} bytes, not a whole number of {dtype.name} tokens: "
            "truncated or written with another dtype; re-run preprocess"
        )
    if size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")

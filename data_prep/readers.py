"""Streaming document readers for .jsonl, .jsonl.gz and plain text (.txt, .txt.gz).

Documents come out as valid UTF-8 bytes, the form sentencepiece encodes without another copy.
Input is read in large chunks and hashed on the way, so memory stays flat and the manifest
gets each file's sha256 without a second pass. Bad input is either repaired and counted
(invalid UTF-8, empty documents, lines without the JSON key when asked to skip them) or
refused with the file, the line and the fix; a file whose first block holds NUL bytes or is
mostly invalid UTF-8 is binary (or in another encoding) and refused whole.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import hashlib
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from lws_megatron.errors import UserError

CHUNK_BYTES = 1 << 22
SNIFF_BYTES = 1 << 16  # the first block, checked for binary content
MAX_INVALID_UTF8_SHARE = 0.1  # above this, a file is not text with a few bad bytes to repair
TEXT_DOCS = ("line", "block")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text")
_UTF8_REPLACEMENT = "\ufffd".encode()
_UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATES = re.compile("[\ud800-\udfff]")
_GZIP_WBITS = 16 + zlib.MAX_WBITS


@dataclass(frozen=True)
class ReaderOptions:
    """How to find documents in the input files."""

    json_key: str = "text"
    text_docs: str = "line"
    skip_missing_key: bool = False


@dataclass
class InputStats:
    """What one input file held; filled in while it is read."""

    path: str
    bytes: int = 0
    sha256: str = ""
    documents: int = 0
    empty: int = 0
    missing_key: int = 0
    invalid_utf8: int = 0
    invalid_utf8_documents: int = 0
    first_invalid_line: int | None = None


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl input")
    parser.add_argument(
        "--skip-missing-key",
        action="store_true",
        help="skip (and count) .jsonl lines without --json-key instead of stopping",
    )
    parser.add_argument(
        "--text-docs",
        choices=TEXT_DOCS,
        default="line",
        help="plain text: one document per line, or per blank-line separated block",
    )


def reader_options(args: argparse.Namespace) -> ReaderOptions:
    return ReaderOptions(
        json_key=args.json_key, text_docs=args.text_docs, skip_missing_key=args.skip_missing_key
    )


def expand_inputs(patterns: Sequence[str], text: bool = True) -> list[str]:
    """Expand globs in order, keep each file once, and refuse patterns that match nothing
    (and, with `text`, files whose name does not say which text format they hold)."""
    paths: dict[str, None] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"input pattern {pattern!r} matches no file; check the path")
        elif os.path.isdir(pattern):
            raise UserError(
                f"input {pattern} is a directory; pass its files, e.g. '{pattern}/*.jsonl'"
            )
        elif not os.path.isfile(pattern):
            raise UserError(f"input file {pattern} does not exist; check the path")
        else:
            matches = [pattern]
        paths.update(dict.fromkeys(matches))
    for path in paths if text else ():
        input_format(path)
    return list(paths)


def input_format(path: str) -> tuple[str, bool]:
    """Return ("jsonl" or "text", gzipped) from the file name, which must say what it holds."""
    name = path.lower()
    gzipped = name.endswith(".gz")
    stem = name[:-3] if gzipped else name
    if stem.endswith(_JSONL_SUFFIXES):
        return "jsonl", gzipped
    if stem.endswith(_TEXT_SUFFIXES):
        return "text", gzipped
    raise UserError(
        f"cannot tell the format of {path} from its name; name it .jsonl, .jsonl.gz, .txt or "
        ".txt.gz"
    )


def read_documents(path: str, options: ReaderOptions, stats: InputStats) -> Iterator[bytes]:
    """Yield the non-empty documents of one file as UTF-8 bytes, updating `stats` as it goes."""
    kind, gzipped = input_format(path)
    chunks = _raw_chunks(path, stats)
    if gzipped:
        chunks = _gunzip(chunks, path)
    lines = _lines(_text_only(chunks, path))
    if kind == "jsonl":
        texts = _jsonl_texts(lines, path, options, stats)
    elif options.text_docs == "line":
        texts = ((n, line.removesuffix(b"\r")) for n, line in enumerate(lines, 1))
    else:
        texts = _blocks(lines)
    for lineno, raw in texts:
        doc = _valid_utf8(raw, stats, lineno)
        if not doc or doc.isspace():
            stats.empty += 1
            continue
        stats.documents += 1
        yield doc


def _raw_chunks(path: str, stats: InputStats) -> Iterator[bytes]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            stats.bytes += len(chunk)
            yield chunk
    stats.sha256 = digest.hexdigest()


def _gunzip(chunks: Iterable[bytes], path: str) -> Iterator[bytes]:
    """Decompress a (possibly multi-member) gzip stream and insist that it ends properly."""
    decomp = zlib.decompressobj(_GZIP_WBITS)
    in_member = False
    for chunk in chunks:
        while chunk:
            in_member = True
            try:
                out = decomp.decompress(chunk)
            except zlib.error as err:
                raise UserError(
                    f"{path} is not a valid gzip file or is corrupt ({err}); "
                    "re-create it, or drop the .gz suffix if it is not compressed"
                ) from None
            if out:
                yield out
            chunk = b""
            if decomp.eof:
                chunk = decomp.unused_data
                decomp = zlib.decompressobj(_GZIP_WBITS)
                in_member = False
    if in_member:
        raise UserError(
            f"{path} is truncated: the gzip stream ends before its end marker "
            "(an interrupted download or copy?); re-create or re-download the file"
        )


def _text_only(chunks: Iterable[bytes], path: str) -> Iterator[bytes]:
    """Pass the stream on once its first block reads as UTF-8 text: a binary file named .txt
    would otherwise be split at its newline bytes into junk documents."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= SNIFF_BYTES:
            break
    block = head[:SNIFF_BYTES]
    if b"\0" in block:
        raise UserError(
            f"{path} holds NUL bytes in its first {len(block):,} bytes: binary, not UTF-8 text "
            "(UTF-16 text? convert it with iconv -t UTF-8); pass text or .jsonl files only"
        )
    decoded = codecs.getincrementaldecoder("utf-8")("replace").decode(block, final=False)
    invalid = decoded.count("\ufffd") - block.count(_UTF8_REPLACEMENT)
    if invalid > MAX_INVALID_UTF8_SHARE * len(block):
        raise UserError(
            f"{path} is not UTF-8 text: {invalid:,} invalid UTF-8 sequences in its first "
            f"{len(block):,} bytes (binary, or another encoding?); convert it to UTF-8 "
            "(e.g. iconv -f LATIN1 -t UTF-8) or leave it out"
        )
    if head:
        yield head
    yield from chunks


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split into lines across chunk boundaries; a leading UTF-8 byte-order mark is dropped."""
    pending: list[bytes] = []
    first = True
    for chunk in chunks:
        if first:
            chunk, first = chunk.removeprefix(_UTF8_BOM), False
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        pending.append(parts[0])
        parts[0] = b"".join(pending)
        pending = [parts.pop()]
        yield from parts
    last = b"".join(pending)
    if last:
        yield last


def _blocks(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Group lines into documents separated by blank lines; report each by its first line."""
    block: list[bytes] = []
    start = 0
    for lineno, line in enumerate(lines, 1):
        line = line.removesuffix(b"\r")
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield start, b"\n".join(block)
            block = []
    if block:
        yield start, b"\n".join(block)


def _jsonl_texts(
    lines: Iterable[bytes], path: str, options: ReaderOptions, stats: InputStats
) -> Iterator[tuple[int, bytes | str]]:
    key = options.json_key
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(_decode(raw, stats, lineno))
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno}); "
                "each line of a .jsonl file must hold one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise UserError(
                f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}; "
                "each line of a .jsonl file must hold one JSON object"
            )
        if key not in record:
            if options.skip_missing_key:
                stats.missing_key += 1
                continue
            keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise UserError(
                f"{path}:{lineno}: no key {key!r} (keys: {keys}); name the text field with "
                "--json-key, or pass --skip-missing-key to skip such lines"
            )
        text = record[key]
        if not isinstance(text, str):
            raise UserError(
                f"{path}:{lineno}: {key!r} holds {type(text).__name__}, not a string; "
                "name the text field with --json-key"
            )
        yield lineno, text


def _decode(raw: bytes, stats: InputStats, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        _count_invalid(stats, text.count("\ufffd") - raw.count(_UTF8_REPLACEMENT), lineno)
        return text


def _valid_utf8(raw: bytes | str, stats: InputStats, lineno: int) -> bytes:
    """Return valid UTF-8, replacing (and counting) invalid bytes and lone surrogates."""
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError:
            text, count = _SURROGATES.subn("\ufffd", raw)
            _count_invalid(stats, count, lineno)
            return text.encode("utf-8")
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError:
        return _decode(raw, stats, lineno).encode("utf-8")


def _count_invalid(stats: InputStats, count: int, lineno: int) -> None:
    stats.invalid_utf8 += count
    stats.invalid_utf8_documents += 1
    if stats.first_invalid_line is None:
        stats.first_invalid_line = lineno


def nonempty_texts(items: Iterator[str], paths: Sequence[str]) -> Iterator[str]:
    """`items`, refused before training when there is none: a tokenizer of no text."""
    first = next(items, None)
    if first is None:
        raise UserError(
            f"no text to train the tokenizer on in {', '.join(paths)} (every document is "
            "empty, or no line holds text); check --input and --json-key"
        )
    return itertools.chain([first], items)

"""Tokenize .jsonl, .jsonl.gz and plain-text files into Megatron-Core indexed datasets.

    python -m data_prep.preprocess --input FILES/GLOBS --tokenizer MODEL --output-prefix PREFIX
        [--workers N] [--json-key text] [--skip-missing-key] [--text-docs line|block]
        [--append-eod] [--eod-token T] [--pad-token T] [--valid-fraction F] [--overwrite] [--quiet]

MODEL is a sentencepiece .model or a Hugging Face tokenizer.json; --eod-token / --pad-token name
the special tokens of a tokenizer.json that does not make them clear
(lws_megatron.dataset.hf_tokenizer).

Outputs, all next to PREFIX:

    PREFIX_train.bin, PREFIX_train.idx   training split, readable by IndexedDataset("PREFIX_train")
    PREFIX_valid.bin, PREFIX_valid.idx   validation split, only when F > 0
    PREFIX.manifest.json                 tokenizer fingerprint, dtype, counts, input hashes

Token ids are uint16 when the vocabulary has at most 65,536 entries, int32 above. A document
goes to the validation split when the first 8 bytes of blake2b(its UTF-8 text), read as a
little-endian integer, fall below F * 2**64: the split depends on the text alone, not on file
order or worker count, and a document repeated in the corpus always lands in the same split.

One thread reads, parses and hashes the next batch while the tokenizer encodes the current one
on N threads (sentencepiece and tokenizers release the GIL) into numpy arrays, and each batch
is written with a few bulk writes, so memory stays at a few batches whatever the corpus size.
Every file is written under a .partial name and renamed at the end, manifest last: an
interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from data_prep.dataset_writer import (
    commit,
    created_now,
    drop_empty_valid,
    output_paths,
    refuse_no_documents,
    split_records,
    split_writers,
    tokenizer_record,
    valid_mask,
)
from data_prep.files import ensure_parent, refuse_existing
from data_prep.readers import (
    InputStats,
    ReaderOptions,
    add_reader_arguments,
    expand_inputs,
    read_documents,
    reader_options,
)
from lws_megatron import __version__
from lws_megatron.cli import HelpFormatter
from lws_megatron.dataset.indexed import IndexedWriter, WrittenFiles, token_dtype
from lws_megatron.dataset.manifest import InputRecord, Manifest, manifest_path, split_prefix
from lws_megatron.dataset.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.errors import UserError, cli_entry

BATCH_BYTES = 1 << 22
BATCH_DOCS = 16384
PREFETCH_BATCHES = 2
SPLIT_HASH = "blake2b(utf8 text, digest_size=8) as little-endian uint64 < valid_fraction * 2**64"

T = TypeVar("T")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class _Batch:
    docs: list[bytes]
    valid: np.ndarray
    input_bytes: int


def _batches(
    paths: Sequence[str], stats: Sequence[InputStats], options: ReaderOptions, fraction: float
) -> Iterator[_Batch]:
    docs: list[bytes] = []
    size = 0
    done = 0
    for path, file_stats in zip(paths, stats):
        for doc in read_documents(path, options, file_stats):
            docs.append(doc)
            size += len(doc)
            if size >= BATCH_BYTES or len(docs) >= BATCH_DOCS:
                yield _Batch(docs, valid_mask(docs, fraction), done + file_stats.bytes)
                docs, size = [], 0
        done += file_stats.bytes
    if docs:
        yield _Batch(docs, valid_mask(docs, fraction), done)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def _prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Produce `items` on a background thread, up to `depth` ahead; its errors are raised here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(_Failed(err))

    thread = threading.Thread(target=produce, name="data_prep-reader", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tokenizing",
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )


def preprocess(
    inputs: Sequence[str],
    tokenizer_path: str,
    output_prefix: str,
    *,
    workers: int | None = None,
    options: ReaderOptions = ReaderOptions(),
    append_eod: bool = False,
    valid_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
    eod_token: str | None = None,
    pad_token: str | None = None,
    warn: Callable[[str], None] = lambda message: print(f"warning: {message}", file=sys.stderr),
) -> Manifest:
    """Tokenize `inputs` into PREFIX_train (and PREFIX_valid) plus PREFIX.manifest.json."""
    if not 0 <= valid_fraction < 1:
        raise UserError(f"--valid-fraction {valid_fraction} is outside [0, 1); use e.g. 0.005")
    workers = workers or default_workers()
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    tokenizer = load_tokenizer(tokenizer_path, eod_token=eod_token, pad_token=pad_token)
    tokenizer.eod_flag(append_eod)
    dtype = token_dtype(tokenizer.vocab_size)
    paths = expand_inputs(inputs)
    refuse_existing(output_paths(output_prefix), overwrite, "output")
    ensure_parent(output_prefix)

    stats = [InputStats(path) for path in paths]
    with split_writers(output_prefix, dtype, valid_fraction) as writers:
        zero_token = _tokenize(
            _batches(paths, stats, options, valid_fraction),
            tokenizer,
            writers,
            append_eod=append_eod,
            workers=workers,
            bar=_progress(sum(os.path.getsize(p) for p in paths), progress),
        )
        written = {split: writer.finish() for split, writer in writers.items()}
    _warn_about_inputs(stats, warn)
    refuse_no_documents(
        writers,
        written,
        f"no documents to write from {', '.join(paths)} "
        f"({sum(s.empty for s in stats) + zero_token} empty, "
        f"{sum(s.missing_key for s in stats)} without the key {options.json_key!r}); "
        "check the inputs, --json-key and --valid-fraction",
    )
    if drop_empty_valid(writers, written):
        warn(
            f"no document fell into the validation split at --valid-fraction {valid_fraction}; "
            "only the train split is written: raise the fraction to get one"
        )
    manifest = _manifest(
        output_prefix, tokenizer, dtype, append_eod, valid_fraction, written, stats, zero_token
    )
    commit(output_prefix, writers, manifest)
    return manifest


def _tokenize(
    batches: Iterator[_Batch],
    tokenizer: Tokenizer,
    writers: dict[str, IndexedWriter],
    *,
    append_eod: bool,
    workers: int,
    bar: tqdm,
) -> int:
    """Encode and write every batch; return how many documents encoded to no token at all."""
    min_tokens = 1 + int(append_eod)
    zero_token = documents = tokens = 0
    start = time.perf_counter()
    with bar, tokenizer.thread_pool(workers) as pool:
        for batch in _prefetch(batches, PREFETCH_BATCHES):
            arrays = tokenizer.encode_arrays(batch.docs, append_eod=append_eod, thread_pool=pool)
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            kept = lengths >= min_tokens
            zero_token += int(np.count_nonzero(~kept))
            for split, writer in writers.items():
                chosen = np.flatnonzero(kept & (batch.valid if split == "valid" else ~batch.valid))
                if len(chosen):
                    writer.add(
                        np.concatenate(
                            [arrays[i] for i in chosen], dtype=writer.dtype, casting="unsafe"
                        ),
                        lengths[chosen],
                    )
            documents += int(np.count_nonzero(kept))
            tokens += int(lengths[kept].sum())
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(
                f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s", refresh=False
            )
            bar.update(batch.input_bytes - bar.n)
    return zero_token


def _manifest(
    prefix: str,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    append_eod: bool,
    valid_fraction: float,
    written: dict[str, WrittenFiles],
    stats: Sequence[InputStats],
    zero_token: int,
) -> Manifest:
    return Manifest(
        tool="data_prep.preprocess",
        tool_version=__version__,
        created=created_now(),
        tokenizer=tokenizer_record(tokenizer, tokenizer.eod),
        dtype=dtype.name,
        append_eod=append_eod,
        valid_fraction=valid_fraction,
        split_hash=SPLIT_HASH,
        splits=split_records(prefix, written),
        inputs=[InputRecord(s.path, s.bytes, s.sha256, s.documents) for s in stats],
        skipped={
            "empty_documents": sum(s.empty for s in stats) + zero_token,
            "missing_key": sum(s.missing_key for s in stats),
        },
        invalid_utf8={
            "replacements": sum(s.invalid_utf8 for s in stats),
            "documents": sum(s.invalid_utf8_documents for s in stats),
        },
    )


def _warn_about_inputs(stats: Sequence[InputStats], warn: Callable[[str], None]) -> None:
    for s in stats:
        if s.invalid_utf8:
            warn(
                f"{s.path}: {s.invalid_utf8} invalid UTF-8 sequence(s) in "
                f"{s.invalid_utf8_documents} "
                f"document(s) replaced with U+FFFD (first at line {s.first_invalid_line})"
            )
        if s.missing_key:
            warn(f"{s.path}: skipped {s.missing_key} line(s) without the JSON key")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.preprocess",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files or globs")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="MODEL",
        help="sentencepiece .model or Hugging Face tokenizer.json",
    )
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="encoding threads (default: all cores)",
    )
    add_reader_arguments(parser)
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="end every document with the tokenizer's end-of-document token",
    )
    parser.add_argument(
        "--eod-token",
        metavar="TOKEN",
        help="a tokenizer.json's end-of-document token, where it is ambiguous",
    )
    parser.add_argument(
        "--pad-token",
        metavar="TOKEN",
        help="a tokenizer.json's padding token, where it is ambiguous",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of documents for PREFIX_valid, chosen by a hash of the text",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset at PREFIX"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    manifest = preprocess(
        args.input,
        args.tokenizer,
        args.output_prefix,
        workers=args.workers,
        options=reader_options(args),
        append_eod=args.append_eod,
        valid_fraction=args.valid_fraction,
        overwrite=args.overwrite,
        progress=not args.quiet,
        eod_token=args.eod_token,
        pad_token=args.pad_token,
    )
    for split, record in manifest.splits.items():
        print(
            f"{split}: {record.documents:,} documents, {record.tokens:,} {manifest.dtype} tokens "
            f"-> {split_prefix(args.output_prefix, split)}.bin/.idx"
        )
    print(
        f"skipped {manifest.skipped['empty_documents']:,} empty document(s); "
        f"manifest {manifest_path(args.output_prefix)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

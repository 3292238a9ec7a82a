"""Import pre-tokenized token files (OLMo/Dolma-style flat arrays of ids) as a checked dataset.

    python -m data_prep.import_tokens --input FILES/GLOBS --dtype uint16|uint32|int32
        --tokenizer MODEL --output-prefix PREFIX [--eod-id N] [--valid-fraction F] [--overwrite]

Each input is one flat array of token ids whose documents are separated by the end-of-document
id: a .npy file with a NumPy header, or a headerless file of little-endian ids (OLMo's memmap
`.npy` files are of this kind). The dtype is the user's to state, never guessed: a header that
says another dtype is refused, and a headerless file must be a whole number of stated ids.
Every document ends with its end-of-document id; ids after a file's last one form a final
document. --eod-id defaults to the tokenizer's end-of-document id and may not contradict it.

The outputs are those of data_prep.preprocess (PREFIX_train, PREFIX_valid, the manifest, the
dtype the vocabulary calls for); a document goes to the validation split when blake2b of its ids
as little-endian uint32 falls below F * 2**64. Ids outside the vocabulary are refused while
reading. The integrity checks of lws_megatron.dataset.integrity then run on the result, among
them the detector of 32-bit ids read as 16-bit ones; if they fail, the outputs are removed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Sequence

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
from data_prep.readers import expand_inputs
from lws_megatron import __version__
from lws_megatron.cli import HelpFormatter
from lws_megatron.dataset.indexed import IndexedWriter, token_dtype
from lws_megatron.dataset.integrity import check_flat_tokens, verify_dataset
from lws_megatron.dataset.manifest import InputRecord, Manifest, manifest_path, split_prefix
from lws_megatron.dataset.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import remove_quietly, sha256_file

DTYPES = ("uint16", "uint32", "int32")
NPY_MAGIC = b"\x93NUMPY"
BATCH_DOCS = 16384
SPLIT_HASH = "blake2b(document ids as little-endian uint32, digest_size=8) < valid_fraction * 2**64"
_SCAN_CHUNK = 1 << 24


@dataclass
class _FileCounts:
    documents: int = 0
    empty: int = 0
    ends_with_eod: bool = True


def read_token_file(path: str, dtype: str) -> np.ndarray:
    """Memory-map one input as a flat array of the stated dtype, refusing any contradiction."""
    stated = np.dtype(dtype).newbyteorder("<")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the --input path") from None
    if magic == NPY_MAGIC:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UserError(
                f"{path} has a NumPy header but cannot be read ({err}); "
                "re-export it with numpy.save"
            ) from None
        if array.dtype.byteorder == ">":
            little = array.dtype.newbyteorder("<")
            raise UserError(
                f"{path} holds big-endian {array.dtype.name} ids (its .npy header says "
                f"{array.dtype.str!r}); token files are little-endian: re-save it with "
                f"numpy.save(path, array.astype({little.str!r}))"
            )
        if array.dtype != stated:
            raise UserError(
                f"{path} holds {array.dtype.name} ids (its .npy header says so) but --dtype is "
                f"{dtype}; state the dtype the file was written with"
            )
        if array.ndim != 1:
            raise UserError(
                f"{path} is a {array.ndim}-D array of shape {array.shape}; "
                "token files are flat: save array.reshape(-1)"
            )
    else:
        size = os.path.getsize(path)
        if size % stated.itemsize:
            raise UserError(
                f"{path} is {size} bytes, not a whole number of {dtype} ids; it has no NumPy "
                "header, so it must be raw ids of the stated --dtype: check --dtype"
            )
        array = np.memmap(path, dtype=stated, mode="r") if size else np.empty(0, dtype=stated)
    if stated.itemsize == 2:
        check_flat_tokens(
            path,
            array,
            "import 32-bit ids with --dtype uint32 or int32, from a "
            ".npy saved with that dtype (not one viewed as uint16)",
        )
    return array


def document_ends(tokens: np.ndarray, eod: int) -> np.ndarray:
    """Exclusive end of every document: one past each eod id, and the end of trailing ids."""
    found = [
        np.flatnonzero(np.asarray(tokens[start : start + _SCAN_CHUNK]) == eod) + start + 1
        for start in range(0, len(tokens), _SCAN_CHUNK)
    ]
    ends = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    return ends.astype(np.int64)


def import_tokens(
    inputs: Sequence[str],
    dtype: str,
    tokenizer_path: str,
    output_prefix: str,
    *,
    eod_id: int | None = None,
    valid_fraction: float = 0.0,
    overwrite: bool = False,
) -> Manifest:
    """Write the documents of `inputs` as PREFIX_train (and PREFIX_valid) plus a manifest."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if not 0 <= valid_fraction < 1:
        raise UserError(f"--valid-fraction {valid_fraction} is outside [0, 1); use e.g. 0.005")
    tokenizer = load_tokenizer(tokenizer_path)
    eod = _eod_id(tokenizer, eod_id)
    paths = expand_inputs(inputs, text=False)
    arrays = [read_token_file(path, dtype) for path in paths]
    refuse_existing(output_paths(output_prefix), overwrite, "output")
    ensure_parent(output_prefix)
    out_dtype = token_dtype(tokenizer.vocab_size)
    with split_writers(output_prefix, out_dtype, valid_fraction) as writers:
        counts = [
            _import_file(path, tokens, eod, tokenizer.vocab_size, valid_fraction, writers)
            for path, tokens in zip(paths, arrays)
        ]
        written = {split: writer.finish() for split, writer in writers.items()}
    refuse_no_documents(
        writers,
        written,
        f"no documents to write from {', '.join(paths)}: the files are empty or "
        f"hold only end-of-document ids ({eod}); check --input and --eod-id",
    )
    drop_empty_valid(writers, written)
    manifest = Manifest(
        tool="data_prep.import_tokens",
        tool_version=__version__,
        created=created_now(),
        tokenizer=tokenizer_record(tokenizer, eod),
        dtype=out_dtype.name,
        append_eod=all(c.ends_with_eod for c in counts),
        valid_fraction=valid_fraction,
        split_hash=SPLIT_HASH,
        splits=split_records(output_prefix, written),
        inputs=[
            InputRecord(path, os.path.getsize(path), sha256_file(path), c.documents)
            for path, c in zip(paths, counts)
        ],
        skipped={"empty_documents": sum(c.empty for c in counts), "missing_key": 0},
    )
    commit(output_prefix, writers, manifest)
    _verify_or_remove(output_prefix, tokenizer, dtype)
    return manifest


def _verify_or_remove(output_prefix: str, tokenizer: Tokenizer, dtype: str) -> None:
    """The full checks on what was written; a failure removes it and names the stated dtype."""
    try:
        verify_dataset(output_prefix, tokenizer_fingerprint=tokenizer.fingerprint)
    except UserError as err:
        for path in output_paths(output_prefix):
            remove_quietly(path)
        raise UserError(
            f"{err} [imported with --dtype {dtype}: if that is not the dtype the "
            "files were written with, import them again with the right one; "
            "the outputs were removed]"
        ) from None


def _eod_id(tokenizer: Tokenizer, stated: int | None) -> int:
    if stated is None:
        if tokenizer.eod is None:
            why = tokenizer.no_eod or f"tokenizer {tokenizer.path} has no end-of-document token"
            raise UserError(f"{why}; or pass the id that separates the documents with --eod-id")
        return tokenizer.eod
    if not 0 <= stated < tokenizer.vocab_size:
        raise UserError(
            f"--eod-id {stated} is outside the {tokenizer.vocab_size}-entry vocabulary "
            f"of {tokenizer.path}"
        )
    if tokenizer.eod is not None and stated != tokenizer.eod:
        raise UserError(
            f"--eod-id {stated} contradicts {tokenizer.path}, whose end-of-document id "
            f"is {tokenizer.eod}; check that the files were made with this tokenizer"
        )
    return stated


def _import_file(
    path: str,
    tokens: np.ndarray,
    eod: int,
    vocab_size: int,
    fraction: float,
    writers: dict[str, IndexedWriter],
) -> _FileCounts:
    ends = document_ends(tokens, eod)
    counts = _FileCounts()
    bar = tqdm(
        range(0, len(ends), BATCH_DOCS),
        desc=f"importing {os.path.basename(path)}",
        unit="batch",
        disable=None if len(ends) > 50 * BATCH_DOCS else True,
    )
    for first in bar:
        batch_ends = ends[first : first + BATCH_DOCS]
        offset = int(ends[first - 1]) if first else 0
        chunk = np.asarray(tokens[offset : int(batch_ends[-1])])
        _check_ids(path, chunk, offset, vocab_size)
        lengths = np.diff(batch_ends, prepend=offset)
        closed = chunk[lengths.cumsum() - 1] == eod
        kept = lengths > closed
        counts.empty += int(np.count_nonzero(~kept))
        counts.documents += int(np.count_nonzero(kept))
        counts.ends_with_eod = counts.ends_with_eod and bool(closed[kept].all())
        valid = _valid(chunk, lengths, fraction)
        for split, writer in writers.items():
            chosen = kept & (valid if split == "valid" else ~valid)
            if chosen.any():
                writer.add(chunk[np.repeat(chosen, lengths)], lengths[chosen])
    return counts


def _check_ids(path: str, chunk: np.ndarray, offset: int, vocab_size: int) -> None:
    bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
    if len(bad):
        raise UserError(
            f"{path}: id {int(chunk[bad[0]])} at token {offset + int(bad[0])} is outside the "
            f"{vocab_size}-entry vocabulary ({len(bad)} such id(s) in one block); the file was "
            "made with another tokenizer or has another dtype than --dtype"
        )


def _valid(chunk: np.ndarray, lengths: np.ndarray, fraction: float) -> np.ndarray:
    if fraction <= 0:
        return np.zeros(len(lengths), dtype=bool)
    words = chunk.astype("<u4")
    bounds = np.concatenate([[0], lengths.cumsum()])
    return valid_mask([words[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])], fraction)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.import_tokens",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files or globs")
    parser.add_argument(
        "--dtype",
        required=True,
        choices=DTYPES,
        help="the dtype the files were written with (never guessed)",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="MODEL",
        help="the sentencepiece .model or tokenizer.json the ids come from",
    )
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX")
    parser.add_argument(
        "--eod-id",
        type=int,
        metavar="N",
        help="id that ends each document (default: the tokenizer's)",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of documents for PREFIX_valid, chosen by a hash of their ids",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset at PREFIX"
    )
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    manifest = import_tokens(
        args.input,
        args.dtype,
        args.tokenizer,
        args.output_prefix,
        eod_id=args.eod_id,
        valid_fraction=args.valid_fraction,
        overwrite=args.overwrite,
    )
    for split, record in manifest.splits.items():
        print(
            f"{split}: {record.documents:,} documents, {record.tokens:,} {manifest.dtype} tokens "
            f"-> {split_prefix(args.output_prefix, split)}.bin/.idx"
        )
    print(
        f"skipped {manifest.skipped['empty_documents']:,} empty document(s); checks passed; "
        f"manifest {manifest_path(args.output_prefix)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

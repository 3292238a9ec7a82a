"""Checks that a tokenized dataset is what its manifest says, run before anything reads it.

`verify_dataset` is what the training runtime calls; `python -m data_prep.inspect` runs the same
checks. In order, for each split:

1. the index is a complete Megatron index whose dtype is the manifest's, and the manifest's
   dtype is the one the vocabulary size calls for (uint16 up to 65,536 ids, int32 above);
2. index and data file agree: the lengths add up to the tokens the .bin holds;
3. no sign of a dtype mix-up: 32-bit ids read as 16-bit ones (the paper's erratum) put a zero
   at every other position, so zeros at odd and even positions are counted in windows spread
   over the file, leaving out each document's last token (which may legitimately be a zero
   end-of-document id); a gap of more than half between the two parities is refused;
4. every id is below the vocabulary size (all of them, streamed through a memory map);
5. the files are the ones the manifest recorded: sizes and sha256 of .idx and .bin. The .bin is
   hashed in the same pass as step 4 reads it, so the hash costs CPU time but no second read;
   `hash_bin=False` leaves it out, and then tokens overwritten in place with other valid ids
   go unnoticed.

Every failure raises UserError naming the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from lws_megatron.dataset.indexed import (
    IndexFile,
    get_bin_path,
    get_idx_path,
    read_index,
    read_tokens,
    token_dtype,
)
from lws_megatron.dataset.manifest import (
    SPLITS,
    Manifest,
    SplitRecord,
    manifest_path,
    read_manifest,
    split_prefix,
)
from lws_megatron.errors import UserError
from lws_megatron.fileio import sha256_file

MIXUP_WINDOWS = 64
MIXUP_WINDOW_TOKENS = 1 << 15
MIXUP_MIN_SAMPLES = 256
MIXUP_ZERO_GAP = 0.5
_SCAN_CHUNK = 1 << 24
_RERUN = "re-run python -m data_prep.preprocess to rebuild it"


@dataclass(frozen=True)
class ParityZeros:
    """How often a token is zero at even and at odd positions of the data file."""

    even: float
    odd: float
    samples: int

    @property
    def gap(self) -> float:
        return abs(self.odd - self.even)


def locate(prefix: str) -> tuple[str, str | None]:
    """Map PREFIX, PREFIX_train or PREFIX_valid to the dataset prefix and the split named, if
    any."""
    if os.path.isfile(manifest_path(prefix)):
        return prefix, None
    for split in SPLITS:
        base = prefix.removesuffix(f"_{split}")
        if base != prefix and os.path.isfile(manifest_path(base)):
            return base, split
    raise UserError(
        f"no manifest for {prefix} (looked for {manifest_path(prefix)}): the dataset was not "
        "made by "
        "data_prep.preprocess or its run did not finish; pass the prefix given to --output-prefix "
        f"(or one of its splits), or {_RERUN}"
    )


def verify_dataset(
    prefix: str,
    *,
    tokenizer_fingerprint: str | None = None,
    tokenizer_path: str | None = None,
    vocab_size: int | None = None,
    hash_bin: bool = True,
) -> Manifest:
    """Check a dataset before it is read; return its manifest or raise UserError.

    `prefix` is the --output-prefix of preprocess (all splits are checked) or one split's
    prefix, PREFIX_train or PREFIX_valid (only that split). `tokenizer_fingerprint` is the
    sha256 of the tokenizer the reader will use (`tokenizer_path` names it in errors);
    `vocab_size` the number of embeddings of the model that will read the ids (at least the
    tokenizer's vocabulary). `hash_bin=False` skips
    the .bin hashes for corpora too large to hash at every start.
    """
    base, named = locate(prefix)
    manifest = read_manifest(manifest_path(base))
    _check_tokenizer(manifest, base, tokenizer_fingerprint, tokenizer_path, vocab_size)
    if named is not None and named not in manifest.splits:
        raise UserError(
            f"{manifest_path(base)} has no {named} split (it has: {', '.join(manifest.splits)}); "
            "re-run preprocess with a larger --valid-fraction to make a validation split"
        )
    for split in [named] if named else list(manifest.splits):
        _check_split(split_prefix(base, split), manifest.splits[split], manifest, hash_bin)
    return manifest


def _check_tokenizer(
    manifest: Manifest, base: str, fingerprint: str | None, path: str | None, vocab_size: int | None
) -> None:
    recorded = manifest.tokenizer
    if fingerprint is not None and fingerprint != recorded.sha256:
        given = path or "the tokenizer given"
        raise UserError(
            f"{base} was tokenized with {recorded.path} (sha256 {recorded.sha256[:16]}...), "
            "not with "
            f"{given} (sha256 {fingerprint[:16]}...); use the tokenizer the manifest names, "
            "or re-run preprocess with yours"
        )
    if vocab_size is not None and recorded.vocab_size > vocab_size:
        raise UserError(
            f"{base} holds ids of a {recorded.vocab_size}-entry vocabulary but the model has only "
            f"{vocab_size} embeddings; set the model's vocabulary size to at least "
            f"{recorded.vocab_size}"
        )
    expected = token_dtype(recorded.vocab_size).name
    if manifest.dtype != expected:
        raise UserError(
            f"{manifest_path(base)} says dtype {manifest.dtype}, but a {recorded.vocab_size}-entry "
            f"vocabulary is stored as {expected}; {_RERUN}"
        )


def _check_split(prefix: str, record: SplitRecord, manifest: Manifest, hash_bin: bool) -> None:
    if record.prefix != os.path.basename(prefix):
        raise UserError(
            f"the manifest describes {record.prefix} but sits next to {prefix}: files renamed? "
            f"rename them back, or {_RERUN}"
        )
    index = read_index(prefix)
    if index.dtype.name != manifest.dtype:
        raise UserError(
            f"{index.path} stores {index.dtype.name} tokens but the manifest records "
            f"{manifest.dtype}: "
            f"the index was rewritten by another tool; {_RERUN}"
        )
    _check_sizes(prefix, index)
    tokens = read_tokens(prefix, index.dtype)
    if index.dtype.itemsize == 2:
        _check_dtype_mixup(prefix, tokens, index)
    digest = hashlib.sha256() if hash_bin else None
    _check_vocabulary(prefix, tokens, index, manifest.tokenizer.vocab_size, digest)
    _check_against_manifest(prefix, index, record, digest)


def _check_sizes(prefix: str, index: IndexFile) -> None:
    count = len(index.lengths)
    if len(index.document_indices) != count + 1 or (count and index.document_indices[-1] != count):
        raise UserError(f"{index.path} has inconsistent document indices; {_RERUN}")
    if count and (index.pointers[0] != 0 or int(index.lengths.min()) < 0):
        raise UserError(f"{index.path} has inconsistent sequence pointers or lengths; {_RERUN}")
    bin_path = get_bin_path(prefix)
    if not os.path.isfile(bin_path):
        raise UserError(f"data file {bin_path} is missing next to {index.path}; {_RERUN}")
    expected = index.tokens * index.dtype.itemsize
    if count:
        expected_end = int(index.pointers[-1]) + int(index.lengths[-1]) * index.dtype.itemsize
        if expected_end != expected:
            raise UserError(
                f"{index.path} has sequence pointers that do not match its lengths; {_RERUN}"
            )
    actual = os.path.getsize(bin_path)
    if actual != expected:
        hint = ""
        if actual == 2 * expected and index.dtype.itemsize == 2:
            hint = " (exactly twice: int32 tokens under a uint16 index, the int32/uint16 mix-up)"
        elif 2 * actual == expected and index.dtype.itemsize == 4:
            hint = " (exactly half: uint16 tokens under an int32 index)"
        raise UserError(
            f"{bin_path} is {actual} bytes but {index.path} describes {index.tokens} "
            f"{index.dtype.name} "
            f"tokens = {expected} bytes{hint}; the two files do not belong together; {_RERUN}"
        )


def _check_dtype_mixup(prefix: str, tokens: np.ndarray, index: IndexFile) -> None:
    zeros = parity_zeros(tokens, index)
    if zeros.samples < MIXUP_MIN_SAMPLES or zeros.gap <= MIXUP_ZERO_GAP:
        return
    lengths = index.lengths[:: max(1, len(index.lengths) // MIXUP_WINDOW_TOKENS)]
    even_lengths = float(np.mean(lengths % 2 == 0)) if len(lengths) else 0.0
    raise UserError(
        f"{get_bin_path(prefix)} looks like 32-bit token ids read as 16-bit ones (the int32/uint16 "
        f"mix-up): {zeros.odd:.0%} of the odd positions are 0 against {zeros.even:.0%} of the even "
        f"ones, and {even_lengths:.0%} of the documents have an even length; {_RERUN} "
        "from the original text instead of converting the old token files"
    )


def check_flat_tokens(path: str, tokens: np.ndarray, fix: str) -> None:
    """The mix-up check on a flat token file without an index, such as an import's input.

    Every position counts: a zero end-of-document id cannot be told apart here, so only a
    near-perfect alternation (which text does not produce) reaches the threshold.
    """
    zeros = parity_zeros(tokens, None)
    if zeros.samples >= MIXUP_MIN_SAMPLES and zeros.gap > MIXUP_ZERO_GAP:
        raise UserError(
            f"{path} looks like 32-bit token ids read as 16-bit ones (the int32/uint16 mix-up): "
            f"{zeros.odd:.0%} of the odd positions are 0 against {zeros.even:.0%} of the even "
            f"ones; {fix}"
        )


def parity_zeros(tokens: np.ndarray, index: IndexFile | None) -> ParityZeros:
    """Share of zero ids at even and odd file positions, sampled, leaving out documents' last
    tokens (all positions count without an index)."""
    total = len(tokens)
    width = min(MIXUP_WINDOW_TOKENS, total) & ~1
    if width == 0:
        return ParityZeros(0.0, 0.0, 0)
    starts = np.unique(np.linspace(0, total - width, MIXUP_WINDOWS).astype(np.int64) & ~1)
    itemsize = tokens.dtype.itemsize
    zeros = np.zeros(2, dtype=np.int64)
    counts = np.zeros(2, dtype=np.int64)
    for start in starts:
        keep = np.ones(width, dtype=bool)
        if index is not None:
            first = max(int(np.searchsorted(index.pointers, start * itemsize, side="right")) - 1, 0)
            last = int(np.searchsorted(index.pointers, (start + width) * itemsize, side="left"))
            ends = index.pointers[first:last] // itemsize + index.lengths[first:last] - 1 - start
            keep[ends[(ends >= 0) & (ends < width)]] = False
        is_zero = np.asarray(tokens[start : start + width]) == 0
        for parity in (0, 1):
            zeros[parity] += np.count_nonzero(is_zero[parity::2] & keep[parity::2])
            counts[parity] += np.count_nonzero(keep[parity::2])
    shares = zeros / np.maximum(counts, 1)
    return ParityZeros(even=float(shares[0]), odd=float(shares[1]), samples=int(counts.min()))


def _check_vocabulary(
    prefix: str, tokens: np.ndarray, index: IndexFile, vocab_size: int, digest: hashlib._Hash | None
) -> None:
    """Scan every id; `digest`, when given, hashes the file's bytes on the way."""
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = np.asarray(tokens[start : start + _SCAN_CHUNK])
        if digest is not None:
            digest.update(chunk)
        if chunk.max() < vocab_size and (chunk.dtype.kind == "u" or chunk.min() >= 0):
            continue
        bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
        position = start + int(bad[0])
        value = int(chunk[bad[0]])
        document = (
            int(np.searchsorted(index.pointers, position * index.dtype.itemsize, side="right")) - 1
        )
        halves = chunk[bad].astype(np.int64) & 0xFFFFFFFF
        packed = chunk.dtype.itemsize == 4 and bool(
            np.all(((halves & 0xFFFF) < vocab_size) & ((halves >> 16) < vocab_size))
        )
        hint = (
            " (they read like two 16-bit ids packed in one 32-bit slot: uint16 tokens read as "
            "int32)"
            if packed
            else ""
        )
        raise UserError(
            f"{get_bin_path(prefix)}: {len(bad)} id(s) outside the {vocab_size}-entry vocabulary "
            f"in one block, first {value} at token {position} (document {document}){hint}; the "
            "file does not "
            f"match the tokenizer in the manifest; {_RERUN}"
        )


def _check_against_manifest(
    prefix: str, index: IndexFile, record: SplitRecord, digest: hashlib._Hash | None
) -> None:
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    found = (len(index.lengths), index.tokens, os.path.getsize(bin_path), os.path.getsize(idx_path))
    recorded = (record.documents, record.tokens, record.bin_bytes, record.idx_bytes)
    if found != recorded:
        raise UserError(
            f"{prefix}.bin/.idx hold {found[0]} documents, {found[1]} tokens, {found[2]} + "
            f"{found[3]} bytes but the manifest records {recorded[0]}, {recorded[1]}, "
            f"{recorded[2]} + {recorded[3]}: "
            f"the files were replaced after the manifest was written; {_RERUN}"
        )
    if sha256_file(idx_path) != record.idx_sha256:
        raise UserError(f"{idx_path} differs from the one the manifest recorded (sha256); {_RERUN}")
    if digest is not None and digest.hexdigest() != record.bin_sha256:
        raise UserError(
            f"{bin_path} differs from the one the manifest recorded (sha256): its tokens were "
            f"changed after preprocessing; {_RERUN}"
        )

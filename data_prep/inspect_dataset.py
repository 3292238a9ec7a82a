"""Show what a tokenized dataset holds and check it the way the training runtime will.

    python -m data_prep.inspect PREFIX [--samples 3] [--tokenizer MODEL] [--skip-bin-hash]

PREFIX is the --output-prefix given to preprocess, or one split (PREFIX_train, PREFIX_valid).
Prints the manifest's summary, then per split the documents, tokens, dtype, the document length
distribution and a few decoded samples, then runs lws_megatron.dataset.integrity.verify_dataset.
A failed check exits with status 2 and says what is wrong and how to fix it. --tokenizer decodes
with that model and also checks that the dataset was made with it; --skip-bin-hash leaves out the
sha256 of the .bin files (the id scan still reads them; the hash adds CPU time on huge corpora).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from lws_megatron.cli import HelpFormatter
from lws_megatron.dataset.indexed import read_index, read_tokens
from lws_megatron.dataset.integrity import locate, verify_dataset
from lws_megatron.dataset.manifest import Manifest, manifest_path, read_manifest, split_prefix
from lws_megatron.dataset.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.errors import cli_entry

SAMPLE_TOKENS = 64
_PERCENTILES = (10, 50, 90, 99)
_MAX_LENGTHS_FOR_PERCENTILES = 1 << 20


def length_summary(lengths: np.ndarray) -> str:
    """min, percentiles, max and mean of the document lengths (percentiles from a strided
    sample)."""
    if len(lengths) == 0:
        return "no documents"
    sample = np.asarray(lengths[:: max(1, len(lengths) // _MAX_LENGTHS_FOR_PERCENTILES)])
    cuts = np.percentile(sample, _PERCENTILES).round().astype(int)
    middle = "  ".join(f"p{p} {c:,}" for p, c in zip(_PERCENTILES, cuts))
    return (
        f"min {int(lengths.min()):,}  {middle}  max {int(lengths.max()):,}  "
        f"mean {float(lengths.mean(dtype=np.float64)):,.1f}"
    )


def _describe(manifest: Manifest, base: str) -> list[str]:
    t = manifest.tokenizer
    inputs = sum(i.bytes for i in manifest.inputs)
    return [
        f"dataset {base} ({manifest_path(base)}), made {manifest.created} by {manifest.tool} "
        f"{manifest.tool_version}",
        f"tokenizer {t.path}: vocabulary {t.vocab_size:,}, eod {t.eod_id}, pad {t.pad_id}, "
        f"sha256 {t.sha256[:16]}...",
        f"dtype {manifest.dtype}; eod appended: {'yes' if manifest.append_eod else 'no'}; "
        f"valid fraction {manifest.valid_fraction}",
        f"inputs: {len(manifest.inputs)} file(s), {inputs / 1e6:,.1f} MB; skipped "
        f"{manifest.skipped.get('empty_documents', 0):,} empty document(s), "
        f"{manifest.skipped.get('missing_key', 0):,} line(s) without the key; "
        f"{manifest.invalid_utf8.get('replacements', 0):,} invalid UTF-8 sequence(s) replaced",
    ]


def _samples(prefix: str, tokenizer: Tokenizer | None, count: int) -> list[str]:
    index = read_index(prefix)
    tokens = read_tokens(prefix, index.dtype)
    lines = []
    documents = len(index.lengths)
    for doc in sorted(
        set(np.linspace(0, documents - 1, min(count, documents)).astype(int).tolist())
    ):
        start = int(index.pointers[doc]) // index.dtype.itemsize
        length = int(index.lengths[doc])
        ids = np.asarray(tokens[start : start + min(length, SAMPLE_TOKENS)])
        shown = json.dumps(tokenizer.decode(ids), ensure_ascii=False) if tokenizer else ids.tolist()
        more = " ..." if length > SAMPLE_TOKENS else ""
        lines.append(f"  document {doc:,} ({length:,} tokens): {shown}{more}")
    return lines


def _split_report(prefix: str) -> list[str]:
    index = read_index(prefix)
    return [
        f"split {os.path.basename(prefix)}: {len(index.lengths):,} documents, {index.tokens:,} "
        f"{index.dtype.name} tokens",
        f"  lengths: {length_summary(index.lengths)}",
    ]


def _sample_tokenizer(path: str | None, manifest: Manifest) -> tuple[Tokenizer | None, str | None]:
    """The tokenizer to decode samples with, or None and why samples are shown as ids."""
    if path is not None:
        return load_tokenizer(path), None
    recorded = manifest.tokenizer.path
    if not os.path.isfile(recorded):
        return (
            None,
            f"(tokenizer {recorded} not found: samples shown as ids; pass --tokenizer to decode)",
        )
    tokenizer = load_tokenizer(recorded)
    if tokenizer.fingerprint != manifest.tokenizer.sha256:
        return None, f"(tokenizer {recorded} has changed since preprocessing: samples shown as ids)"
    return tokenizer, None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("prefix", metavar="PREFIX")
    parser.add_argument(
        "--samples", type=int, default=3, metavar="N", help="decoded documents per split"
    )
    parser.add_argument(
        "--tokenizer", metavar="MODEL", help="decode with this model and check it was used"
    )
    parser.add_argument(
        "--skip-bin-hash",
        action="store_true",
        help="don't compare the .bin files' sha256 with the manifest (faster on "
        "huge corpora; tokens changed in place then go unnoticed)",
    )
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    base, named = locate(args.prefix)
    manifest = read_manifest(manifest_path(base))
    tokenizer, note = _sample_tokenizer(args.tokenizer, manifest)
    splits = [named] if named else list(manifest.splits)
    print("\n".join(_describe(manifest, base)))
    for split in splits:
        print("\n".join(_split_report(split_prefix(base, split))))
    fingerprint = tokenizer.fingerprint if args.tokenizer else None
    verify_dataset(args.prefix, tokenizer_fingerprint=fingerprint, hash_bin=not args.skip_bin_hash)
    if args.samples > 0:
        if note:
            print(note)
        for split in splits:
            print(f"samples from {split}:")
            print("\n".join(_samples(split_prefix(base, split), tokenizer, args.samples)))
    print(
        f"checks passed: {args.prefix} matches its manifest"
        + (" (.bin hashes not checked)" if args.skip_bin_hash else ", .bin hashes included")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

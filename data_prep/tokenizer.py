"""Train the project's tokenizers: sentencepiece models and Hugging Face tokenizer.json.

    python -m data_prep.tokenizer train --input FILES... --vocab-size N --output PREFIX
        [--format sentencepiece|hf] [--model-type bpe|unigram] [--json-key text]
        [--text-docs line|block] [--max-sentences N] [--overwrite]

The sentencepiece format (the default) writes PREFIX.model (what every other tool takes) and
PREFIX.vocab, with fixed special ids (data_prep.sentencepiece_trainer lists them). --format hf
writes PREFIX.json, a byte-level BPE tokenizer.json like GPT-NeoX's and OLMo's
(data_prep.hf_trainer), trained on whole documents. Both are deterministic. Every tool that
takes a tokenizer accepts either file (or a folder holding a tokenizer.json):
lws_megatron.dataset.tokenizer loads them, reading the special ids of a tokenizer.json from it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from data_prep.hf_trainer import train_hf
from data_prep.readers import ReaderOptions, add_reader_arguments, expand_inputs, reader_options
from data_prep.sentencepiece_trainer import DEFAULT_MAX_SENTENCES, train_sentencepiece
from lws_megatron.cli import HelpFormatter
from lws_megatron.dataset.tokenizer import Tokenizer
from lws_megatron.errors import UserError, cli_entry

MODEL_TYPES = ("bpe", "unigram")
FORMATS = ("sentencepiece", "hf")


def train_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    *,
    model_type: str = "bpe",
    options: ReaderOptions = ReaderOptions(),
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    overwrite: bool = False,
    fmt: str = "sentencepiece",
) -> Tokenizer:
    """Train on the documents of `inputs` and write PREFIX.model and PREFIX.vocab atomically
    (PREFIX.json with `fmt="hf"`)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown tokenizer format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}"
        )
    paths = expand_inputs(inputs)
    if fmt == "hf":
        return train_hf(paths, vocab_size, output_prefix, options, overwrite)
    return train_sentencepiece(
        paths,
        vocab_size,
        output_prefix,
        model_type=model_type,
        options=options,
        max_sentences=max_sentences,
        overwrite=overwrite,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.tokenizer",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a tokenizer on jsonl/txt files", formatter_class=HelpFormatter
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files or globs")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument(
        "--output",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.model and PREFIX.vocab (PREFIX.json with --format hf)",
    )
    train.add_argument(
        "--format",
        choices=FORMATS,
        default="sentencepiece",
        help="sentencepiece model, or hf: a byte-level BPE tokenizer.json",
    )
    train.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default="bpe",
        help="sentencepiece algorithm (--format hf is always byte-level BPE)",
    )
    add_reader_arguments(train)
    train.add_argument(
        "--max-sentences",
        type=int,
        default=DEFAULT_MAX_SENTENCES,
        metavar="N",
        help="train on a fixed random sample of at most N lines",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tokenizer = train_tokenizer(
        args.input,
        args.vocab_size,
        args.output,
        model_type=args.model_type,
        options=reader_options(args),
        max_sentences=args.max_sentences,
        overwrite=args.overwrite,
        fmt=args.format,
    )
    kind = "byte-level BPE tokenizer.json" if args.format == "hf" else args.model_type
    print(
        f"wrote {tokenizer.path}: {kind}, vocabulary {tokenizer.vocab_size}, "
        f"eod={tokenizer.eod} pad={tokenizer.pad}, sha256 {tokenizer.fingerprint[:16]}..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

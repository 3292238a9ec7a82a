"""Train and load the project's tokenizers: sentencepiece models and Hugging Face tokenizer.json.

    python -m data_prep.tokenizer train --input FILES... --vocab-size N --output PREFIX
        [--format sentencepiece|hf] [--model-type bpe|unigram] [--json-key text]
        [--text-docs line|block] [--max-sentences N] [--overwrite]

The sentencepiece format (the default) writes PREFIX.model (what every other tool takes) and
PREFIX.vocab (piece and score per line, for people). Special-token ids are fixed, so configs and
checks can rely on them:

    0 <pad>   padding; preprocess never writes it, so zeros in a token file stand out
    1 <eod>   end of document (sentencepiece's eos), appended by preprocess --append-eod
    2 <bos>   beginning of sequence
    3 <unk>   unknown (unused in practice: byte fallback spells any character in bytes)
    4..259    the 256 byte-fallback pieces <0x00>..<0xFF>, then the learned pieces

The specials are control symbols: the text "<eod>" in a document is spelled with ordinary
pieces and can never produce id 1. Normalization is the identity and whitespace is kept, so
decode(encode(text)) == text. Training is deterministic: one thread, a fixed seed and a fixed
sample of at most --max-sentences lines give byte-identical model files for the same input.

--format hf writes PREFIX.json, a byte-level BPE tokenizer.json like GPT-NeoX's and OLMo's
(see data_prep.hf_tokenizer), trained on whole documents; it is deterministic too. Every tool
that takes a tokenizer accepts either file (or a folder holding a tokenizer.json); the special
ids of a tokenizer.json are read from it, never assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from data_prep import hf_tokenizer
from data_prep.files import ensure_parent, refuse_existing
from data_prep.readers import (
    InputStats,
    ReaderOptions,
    add_reader_arguments,
    expand_inputs,
    read_documents,
    reader_options,
)
from lws_megatron.cli import HelpFormatter
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import write_bytes_atomic

PAD_ID, EOD_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
FORMATS = ("sentencepiece", "hf")
SENTENCEPIECE, HUGGING_FACE = "sentencepiece", "tokenizer.json"
TRAINING_SEED = 1234
DEFAULT_MAX_SENTENCES = 5_000_000
_MAX_SENTENCE_BYTES = 1 << 14
_MIN_SENTENCEPIECE_VOCAB = 256 + 4 + 1  # byte fallback's pieces, the specials, one character
# Fixed for every sentencepiece model: ids of the specials, the text kept exactly as written.
_SENTENCEPIECE_OPTIONS = dict(
    byte_fallback=True,
    pad_id=PAD_ID,
    eos_id=EOD_ID,
    bos_id=BOS_ID,
    unk_id=UNK_ID,
    pad_piece="<pad>",
    eos_piece="<eod>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentence_length=_MAX_SENTENCE_BYTES,
    shuffle_input_sentence=True,
    num_threads=1,
    minloglevel=2,
)
_HF_TASK_DOCS = 256


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer (`kind` says which library) with its special ids and file's sha256.

    `no_eod` says why `eod` is None, so a tool that needs it can tell the user what to do.
    """

    path: str
    fingerprint: str
    vocab_size: int
    eod: int | None
    pad: int | None
    bos: int | None
    unk: int | None
    processor: spm.SentencePieceProcessor | HFTokenizer = field(repr=False, compare=False)
    kind: str = SENTENCEPIECE
    no_eod: str = ""

    def encode(
        self, texts: Sequence[str], *, append_eod: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        if self.kind == HUGGING_FACE:
            tail = [self.eod] if self.eod_flag(append_eod) else []
            encoded = self.processor.encode_batch_fast(list(texts), add_special_tokens=False)
            return [e.ids + tail for e in encoded]
        return self.processor.encode(
            list(texts), add_eos=self.eod_flag(append_eod), num_threads=num_threads
        )

    @contextlib.contextmanager
    def thread_pool(self, workers: int) -> Iterator[spm.ThreadPool | ThreadPoolExecutor]:
        """The pool `encode_arrays` runs on: sentencepiece's own, or Python threads for
        tokenizers (which releases the GIL while it encodes)."""
        if self.kind == HUGGING_FACE:
            with ThreadPoolExecutor(workers, thread_name_prefix="data_prep-encode") as pool:
                yield pool
        else:
            yield spm.ThreadPool(workers)

    def encode_arrays(
        self,
        docs: list[bytes],
        *,
        append_eod: bool,
        thread_pool: spm.ThreadPool | ThreadPoolExecutor,
    ) -> list[np.ndarray]:
        """Encode a batch of UTF-8 documents on the pool's threads into int32 arrays."""
        if self.kind == HUGGING_FACE:
            tail = [self.eod] if self.eod_flag(append_eod) else []
            chunks = [docs[i : i + _HF_TASK_DOCS] for i in range(0, len(docs), _HF_TASK_DOCS)]
            encoded = thread_pool.map(lambda chunk: self._hf_arrays(chunk, tail), chunks)
            return [array for arrays in encoded for array in arrays]
        return self.processor.encode(
            docs, out_type="numpy", add_eos=self.eod_flag(append_eod), thread_pool=thread_pool
        )

    def _hf_arrays(self, docs: list[bytes], tail: list[int]) -> list[np.ndarray]:
        texts = [doc.decode("utf-8") for doc in docs]
        encoded = self.processor.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids + tail, dtype=np.int32) for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def eod_flag(self, append_eod: bool) -> bool:
        """Whether to append the end-of-document id, refusing when the tokenizer lacks one."""
        if append_eod and self.eod is None:
            raise UserError(
                self.no_eod
                or f"tokenizer {self.path} has no end-of-document (eos) token, so "
                "--append-eod cannot be honoured; train one with "
                "python -m data_prep.tokenizer train"
            )
        return append_eod


def load_tokenizer(
    path: str | os.PathLike, *, eod_token: str | None = None, pad_token: str | None = None
) -> Tokenizer:
    """Load a sentencepiece .model or a tokenizer.json (or a folder holding one); the
    fingerprint is the sha256 of the file's bytes. `eod_token` / `pad_token` name the special
    tokens of a tokenizer.json whose own files leave them ambiguous."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(
            f"cannot read tokenizer {path} ({err.strerror}); train one with "
            "python -m data_prep.tokenizer train, or pass the path to its .model or tokenizer.json"
        ) from None
    fingerprint = hashlib.sha256(data).hexdigest()
    if hf_tokenizer.looks_like_json(data):
        return _load_hf(path, data, fingerprint, eod_token, pad_token)
    if eod_token is not None or pad_token is not None:
        raise UserError(
            f"{path} is a sentencepiece model, whose special tokens are fixed; "
            "--eod-token and --pad-token apply to tokenizer.json files only"
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError):
        raise UserError(
            f"{path} is not a sentencepiece model or a tokenizer.json; pass the .model file "
            "or the tokenizer.json"
        ) from None

    def special(token_id: int) -> int | None:
        return token_id if token_id >= 0 else None

    return Tokenizer(
        path=path,
        fingerprint=fingerprint,
        vocab_size=processor.get_piece_size(),
        eod=special(processor.eos_id()),
        pad=special(processor.pad_id()),
        bos=special(processor.bos_id()),
        unk=processor.unk_id(),
        processor=processor,
    )


def _load_hf(
    path: str, data: bytes, fingerprint: str, eod_token: str | None, pad_token: str | None
) -> Tokenizer:
    processor = hf_tokenizer.parse(path, data)
    hf = hf_tokenizer
    eod = hf.resolve(processor, path, "eod", hf.EOD_NAMES, eod_token, "eos_token")
    pad = hf.resolve(processor, path, "pad", hf.PAD_NAMES, pad_token, "pad_token")
    bos = hf.resolve(processor, path, "bos", hf.BOS_NAMES, None, "bos_token")
    unk_token = getattr(processor.model, "unk_token", None)
    return Tokenizer(
        path=path,
        fingerprint=fingerprint,
        vocab_size=processor.get_vocab_size(with_added_tokens=True),
        eod=eod.id,
        pad=pad.id,
        bos=bos.id,
        unk=processor.token_to_id(unk_token) if unk_token else None,
        processor=processor,
        kind=HUGGING_FACE,
        no_eod=eod.why_unknown and f"this needs an end-of-document token: {eod.why_unknown}",
    )


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
        return _train_hf(paths, vocab_size, output_prefix, options, overwrite)
    if vocab_size < _MIN_SENTENCEPIECE_VOCAB:  # refused before reading a corpus
        raise UserError(
            f"--vocab-size {vocab_size} is too small for sentencepiece with byte fallback: it "
            "needs 256 byte pieces, 4 special tokens and one piece per character of the input "
            f"(at least {_MIN_SENTENCEPIECE_VOCAB}); use e.g. --vocab-size 4096"
        )
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    refuse_existing([model_path, vocab_path], overwrite, "tokenizer output")
    ensure_parent(model_path)  # before training: an unwritable output fails in seconds
    model = io.BytesIO()
    lines = _KeepError(_nonempty(_training_lines(paths, options), paths))
    spm.set_random_generator_seed(TRAINING_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            input_sentence_size=max_sentences,
            **_SENTENCEPIECE_OPTIONS,
        )
    except RuntimeError as err:
        if lines.error is not None:
            raise lines.error from None
        raise _training_error(err, vocab_size, paths) from None
    write_bytes_atomic(model_path, model.getvalue())
    tokenizer = load_tokenizer(model_path)
    write_bytes_atomic(vocab_path, _vocab_listing(tokenizer.processor).encode("utf-8"))
    return tokenizer


def _train_hf(
    paths: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    options: ReaderOptions,
    overwrite: bool,
) -> Tokenizer:
    path = output_prefix + ".json"
    refuse_existing([path], overwrite, "tokenizer output")
    ensure_parent(path)
    documents = _nonempty(
        (
            doc.decode("utf-8")
            for source in paths
            for doc in read_documents(source, options, InputStats(source))
        ),
        paths,
    )
    write_bytes_atomic(path, hf_tokenizer.train(documents, vocab_size).encode("utf-8"))
    return load_tokenizer(path)


def _training_lines(paths: Sequence[str], options: ReaderOptions) -> Iterator[str]:
    """Sentencepiece learns from lines; a document's lines are its natural sentences."""
    for path in paths:
        for doc in read_documents(path, options, InputStats(path)):
            for line in doc.decode("utf-8").split("\n"):
                if line and not line.isspace():
                    yield line


def _nonempty(items: Iterator[str], paths: Sequence[str]) -> Iterator[str]:
    """`items`, refused before training when there is none: a tokenizer of no text."""
    first = next(items, None)
    if first is None:
        raise UserError(
            f"no text to train the tokenizer on in {', '.join(paths)} (every document is "
            "empty, or no line holds text); check --input and --json-key"
        )
    return itertools.chain([first], items)


class _KeepError:
    """Keep an error raised while reading, which sentencepiece would turn into a RuntimeError."""

    def __init__(self, items: Iterator[str]) -> None:
        self.items = items
        self.error: Exception | None = None

    def __iter__(self) -> "_KeepError":
        return self

    def __next__(self) -> str:
        try:
            return next(self.items)
        except StopIteration:
            raise
        except Exception as err:
            self.error = err
            raise


def _vocab_listing(processor: spm.SentencePieceProcessor) -> str:
    return "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n"
        for i in range(processor.get_piece_size())
    )


def _training_error(err: Exception, vocab_size: int, paths: Sequence[str]) -> UserError:
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
    if needed:  # its advice names a --character_coverage option that we do not have
        return UserError(
            f"--vocab-size {vocab_size} is below the {needed.group(1)} pieces that "
            f"{', '.join(paths)} needs (256 bytes, 4 special tokens and one per character "
            f"it holds); use --vocab-size {needed.group(1)} or more"
        )
    return UserError(
        f"sentencepiece cannot train on {', '.join(paths)}: {_sentencepiece_reason(err)}"
    )


def _sentencepiece_reason(err: Exception) -> str:
    """The human part of a sentencepiece error, without its source location and assertion."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[-1].rsplit("] ", 1)[-1]


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

"""The sentencepiece trainer behind `python -m data_prep.tokenizer train` (the default format).

It writes PREFIX.model (what every other tool takes) and PREFIX.vocab (piece and score per
line, for people). Special-token ids are fixed, so configs and checks can rely on them:

    0 <pad>   padding; preprocess never writes it, so zeros in a token file stand out
    1 <eod>   end of document (sentencepiece's eos), appended by preprocess --append-eod
    2 <bos>   beginning of sequence
    3 <unk>   unknown (unused in practice: byte fallback spells any character in bytes)
    4..259    the 256 byte-fallback pieces <0x00>..<0xFF>, then the learned pieces

The specials are control symbols: the text "<eod>" in a document is spelled with ordinary
pieces and can never produce id 1. Normalization is the identity and whitespace is kept, so
decode(encode(text)) == text. Training is deterministic: one thread, a fixed seed and a fixed
sample of at most --max-sentences lines give byte-identical model files for the same input.
"""

from __future__ import annotations

import io
import re
from typing import Iterator, Sequence

import sentencepiece as spm

from data_prep.files import ensure_parent, refuse_existing
from data_prep.readers import InputStats, ReaderOptions, nonempty_texts, read_documents
from lws_megatron.dataset.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.errors import UserError
from lws_megatron.fileio import write_bytes_atomic

PAD_ID, EOD_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
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


def train_sentencepiece(
    paths: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    *,
    model_type: str,
    options: ReaderOptions,
    max_sentences: int,
    overwrite: bool,
) -> Tokenizer:
    """Train on the lines of `paths` and write PREFIX.model and PREFIX.vocab atomically."""
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
    lines = _KeepError(nonempty_texts(_training_lines(paths, options), paths))
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


def _training_lines(paths: Sequence[str], options: ReaderOptions) -> Iterator[str]:
    """Sentencepiece learns from lines; a document's lines are its natural sentences."""
    for path in paths:
        for doc in read_documents(path, options, InputStats(path)):
            for line in doc.decode("utf-8").split("\n"):
                if line and not line.isspace():
                    yield line


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

"""The byte-level BPE trainer behind `python -m data_prep.tokenizer train --format hf`.

It writes a GPT-NeoX-style byte-level BPE: <|endoftext|> = 0, <|padding|> = 1, the 256
byte symbols, then the merges. Every string is spelled in bytes, so decode(encode(t)) == t.
Training is deterministic: the same documents give a byte-identical file.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_prep.files import ensure_parent, refuse_existing
from data_prep.readers import InputStats, ReaderOptions, nonempty_texts, read_documents
from lws_megatron.dataset.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.errors import UserError
from lws_megatron.fileio import write_bytes_atomic

TRAINED_SPECIALS = ("<|endoftext|>", "<|padding|>")


def train_hf(
    paths: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    options: ReaderOptions,
    overwrite: bool,
) -> Tokenizer:
    """Train on the documents of `paths` and write PREFIX.json atomically."""
    path = output_prefix + ".json"
    refuse_existing([path], overwrite, "tokenizer output")
    ensure_parent(path)
    documents = nonempty_texts(
        (
            doc.decode("utf-8")
            for source in paths
            for doc in read_documents(source, options, InputStats(source))
        ),
        paths,
    )
    write_bytes_atomic(path, train(documents, vocab_size).encode("utf-8"))
    return load_tokenizer(path)


def train(documents: Iterable[str], vocab_size: int) -> str:
    """A byte-level BPE trained on `documents`, as tokenizer.json text."""
    minimum = 256 + len(TRAINED_SPECIALS)
    if vocab_size < minimum:
        raise UserError(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE: it needs "
            f"at least {minimum} (256 bytes and {len(TRAINED_SPECIALS)} specials)"
        )
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer.to_str(pretty=True)

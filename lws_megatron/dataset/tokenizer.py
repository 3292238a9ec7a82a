"""The tokenizer a run and an export load: a sentencepiece .model or a Hugging Face
tokenizer.json (or a folder holding one), with its special ids and the sha256 of its file.

The ids of a sentencepiece model trained by `python -m data_prep.tokenizer train` are fixed
(see data_prep.sentencepiece_trainer); those of a tokenizer.json are read from it, never assumed
(see lws_megatron.dataset.hf_tokenizer).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from lws_megatron.dataset import hf_tokenizer
from lws_megatron.errors import UserError

SENTENCEPIECE, HUGGING_FACE = "sentencepiece", "tokenizer.json"
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

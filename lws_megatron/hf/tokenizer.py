"""The run's tokenizer as a Hugging Face fast tokenizer: `tokenizer.json` + `tokenizer_config.json`.

A sentencepiece model is converted by transformers' own converter, which follows the model's
normalizer (identity, spaces as "▁", the dummy prefix) and ranks BPE merges by piece score, so
the fast tokenizer gives sentencepiece's ids; its decoder turns byte-fallback pieces such as
<0x0A> back into bytes, so decode(encode(text)) == text. The control pieces (<pad>, <eod>,
<bos>) and <unk> become special tokens, skipped when decoding; `split_special_tokens` keeps
their text in a document spelled with ordinary pieces, as sentencepiece and data_prep do. A
tokenizer.json run is copied as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lws_megatron.dataset.tokenizer import HUGGING_FACE, Tokenizer
from lws_megatron.fileio import write_json_atomic, write_text_atomic

_CONTROL, _UNKNOWN = 3, 2  # sentencepiece's ModelProto.SentencePiece.Type


def from_sentencepiece(model: bytes):
    """A `tokenizers.Tokenizer` that encodes and decodes as the sentencepiece `model` does."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    specials = [p.piece for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer


def write_tokenizer(tok: Tokenizer, output: Path, max_length: int) -> dict[str, int | None]:
    """Write the fast tokenizer of `tok` into `output`; return the special ids for config.json."""
    if tok.kind == HUGGING_FACE:
        shutil.copyfile(tok.path, output / "tokenizer.json")
        name = tok.processor.id_to_token
    else:
        converted = from_sentencepiece(Path(tok.path).read_bytes())
        write_text_atomic(output / "tokenizer.json", converted.to_str(pretty=True))
        name = tok.processor.id_to_piece
    specials = {
        "eos_token": tok.eod,
        "pad_token": tok.pad,
        "bos_token": tok.bos,
        "unk_token": tok.unk,
    }
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **{key: None if i is None else name(i) for key, i in specials.items()},
    }
    write_json_atomic(output / "tokenizer_config.json", settings)
    return {"eos_token_id": tok.eod, "pad_token_id": tok.pad, "bos_token_id": tok.bos}

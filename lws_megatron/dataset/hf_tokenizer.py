"""Hugging Face `tokenizer.json` tokenizers, loaded with their special ids.

A tokenizer.json does not say which of its tokens ends a document or pads (transformers keeps
that in tokenizer_config.json), so the ids are looked up, in this order: the name the user gives
(--eod-token / --pad-token), `eos_token` / `pad_token` of a tokenizer_config.json in the same
folder, and the one special token whose name is a known spelling (GPT-NeoX and OLMo:
<|endoftext|> and <|padding|>). Several known spellings is ambiguous: the id stays unknown and
a tool that needs it asks for the name instead of picking one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from lws_megatron.errors import UserError

EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<eod>")

PAD_NAMES = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]")

BOS_NAMES = ("<|startoftext|>", "<|begin_of_text|>", "<s>", "<bos>")

CONFIG_NAME = "tokenizer_config.json"


@dataclass(frozen=True)
class Special:
    """One special id as resolved: the id, or None and why it is unknown."""

    id: int | None
    why_unknown: str = ""


def looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def parse(path: str, data: bytes) -> HFTokenizer:
    """The tokenizer, set to spell special-token text in documents with ordinary tokens: as with
    sentencepiece's control symbols, only --append-eod writes the end-of-document id."""
    try:
        tokenizer = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
        raise UserError(
            f"{path} is not a Hugging Face tokenizer.json ({err}); pass a tokenizer.json saved by "
            "the tokenizers library or a sentencepiece .model"
        ) from None
    tokenizer.encode_special_tokens = True
    return tokenizer


def resolve(
    tokenizer: HFTokenizer,
    path: str,
    role: str,
    names: tuple[str, ...],
    given: str | None,
    config_key: str,
) -> Special:
    """The id of the token that plays `role`; see the module docstring for the order."""
    option = f"--{role}-token"
    if given is not None:
        token_id = tokenizer.token_to_id(given)
        if token_id is None:
            raise UserError(
                f"{option} {given!r} is not a token of {path}; name one of its "
                f"special tokens: {', '.join(_specials(tokenizer)) or '(none)'}"
            )
        return Special(token_id)
    configured = _configured(path, config_key)
    if configured is not None and tokenizer.token_to_id(configured) is not None:
        return Special(tokenizer.token_to_id(configured))
    found = [name for name in names if name in _specials(tokenizer)]
    if len(found) == 1:
        return Special(tokenizer.token_to_id(found[0]))
    if found:
        return Special(
            None,
            f"{path} has several {role} candidates ({', '.join(found)}); "
            f"name the right one with {option}",
        )
    return Special(
        None,
        f"{path} has no {role} token among its special tokens "
        f"({', '.join(_specials(tokenizer)) or 'none'}); name one with {option}",
    )


def _specials(tokenizer: HFTokenizer) -> list[str]:
    return [t.content for _, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special]


def _configured(path: str, key: str) -> str | None:
    """`key` of a transformers tokenizer_config.json next to the tokenizer.json, if any."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    try:
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get(key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"cannot read {config} ({err}); fix or remove it") from None
    return value.get("content") if isinstance(value, dict) else value

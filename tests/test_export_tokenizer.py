"""The export's tokenizer: the run's sentencepiece model as a fast tokenizer.json that plain
`AutoTokenizer` loads (no remote code), giving sentencepiece's ids for every document of the
demo corpus and decoding them back to the same text, newlines and bytes included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from transformers import AutoTokenizer

from lws_megatron.dataset.tokenizer import load_tokenizer
from lws_megatron.hf.tokenizer import write_tokenizer

EXTRA = [
    "line one\nline two\n\n\tindented  twice   spaced",
    " leading space and trailing  ",
    "bytes: é ü 日本語 🙂 \x00 \x7f",
    "the text <eod> and <pad> are not special here",
    "1234567 8.9e-10",
    "\n",
]


@pytest.fixture(scope="module")
def converted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    ours = load_tokenizer(tiny_data["tokenizer"])
    ids = write_tokenizer(ours, out, max_length=32)
    return ours, AutoTokenizer.from_pretrained(out), ids


def corpus(tiny_data) -> list[str]:
    path = Path(tiny_data["tokenizer"]).parent / "corpus" / "pydocs.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_fast_tokenizer_gives_sentencepieces_ids_and_text_back(converted, tiny_data):
    ours, fast, _ = converted
    texts = corpus(tiny_data) + EXTRA
    assert len(texts) > 600 and sum(t.count("\n") for t in texts) > 10_000
    for text in texts:
        ids = fast(text).input_ids
        assert ids == ours.processor.encode(text), text[:80]
        assert fast.decode(ids) == text


def test_special_tokens_are_the_runs(converted):
    ours, fast, ids = converted
    assert (fast.eos_token_id, fast.pad_token_id, fast.bos_token_id) == (
        ours.eod,
        ours.pad,
        ours.bos,
    )
    assert ids == {"eos_token_id": ours.eod, "pad_token_id": ours.pad, "bos_token_id": ours.bos}
    text = "end of a document"
    assert fast.decode(fast(text).input_ids + [ours.eod], skip_special_tokens=True) == text
    assert ours.eod not in fast("<eod>").input_ids

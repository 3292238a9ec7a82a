"""The sentencepiece tokenizer: training, special ids, loading errors."""

import hashlib
from pathlib import Path

import pytest

from data_prep.tokenizer import train_tokenizer
from lws_megatron.dataset.tokenizer import load_tokenizer
from lws_megatron.errors import UserError


def test_tokenizer_training_is_deterministic_with_fixed_special_ids(
    tmp_path, tok_path, tok, sample_docs
):
    again = train_tokenizer(
        [str(Path(tok_path).parent / "train.txt")], 800, str(tmp_path / "again")
    )
    model = Path(tok_path).read_bytes()
    assert Path(again.path).read_bytes() == model
    assert again.fingerprint == tok.fingerprint == hashlib.sha256(model).hexdigest()
    assert (tok.pad, tok.eod, tok.bos, tok.unk, tok.vocab_size) == (0, 1, 2, 3, 800)
    assert [tok.processor.id_to_piece(i) for i in range(5)] == [
        "<pad>",
        "<eod>",
        "<bos>",
        "<unk>",
        "<0x00>",
    ]
    assert tok.eod not in tok.encode(["text that says <eod> and <pad>"])[0]
    assert all(tok.decode(ids) == doc for ids, doc in zip(tok.encode(sample_docs), sample_docs))
    assert Path(tok_path).with_suffix(".vocab").read_text(encoding="utf-8").startswith("<pad>\t")


def test_unigram_tokenizer_and_training_errors(tmp_path, tok_path, sample_docs):
    corpus = str(Path(tok_path).parent / "train.txt")
    unigram = train_tokenizer([corpus], 600, str(tmp_path / "uni"), model_type="unigram")
    assert unigram.processor.decode(unigram.processor.encode(sample_docs[3])) == sample_docs[3]
    with pytest.raises(UserError, match="too high"):
        train_tokenizer([corpus], 500_000, str(tmp_path / "huge"))
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train_tokenizer([corpus], 600, str(tmp_path / "uni"))
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(corpus)
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("fmt", ["sentencepiece", "hf"])
@pytest.mark.parametrize("vocab_size", [0, -5, 100])
def test_a_vocabulary_too_small_is_refused_naming_the_minimum(tmp_path, fmt, vocab_size):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    with pytest.raises(UserError, match=rf"--vocab-size {vocab_size} is too small .*at least \d+"):
        train_tokenizer([str(corpus)], vocab_size, str(tmp_path / "tok"), fmt=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


@pytest.mark.parametrize("fmt", ["sentencepiece", "hf"])
@pytest.mark.parametrize("content", ["", "\n\n  \n", '{"text": ""}\n{"text": ""}\n'])
def test_training_on_no_text_is_refused_in_one_line(tmp_path, fmt, content):
    corpus = tmp_path / ("corpus.jsonl" if "text" in content else "corpus.txt")
    corpus.write_text(content)
    with pytest.raises(UserError, match=rf"no text to train the tokenizer on in {corpus}"):
        train_tokenizer([str(corpus)], 4096, str(tmp_path / "tok"), fmt=fmt)
    assert [p.name for p in tmp_path.iterdir()] == [corpus.name]


def test_a_vocabulary_below_the_texts_characters_names_the_size_needed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(chr(0x4E00 + i) for i in range(100)) + "\n")  # and U+2581
    with pytest.raises(
        UserError, match=r"--vocab-size 300 is below the 361 pieces that .* use --vocab-size 361"
    ):
        train_tokenizer([str(corpus)], 300, str(tmp_path / "tok"))

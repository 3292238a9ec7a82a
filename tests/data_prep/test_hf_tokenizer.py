"""Hugging Face tokenizer.json tokenizers: training, special ids, indexing, checks and training."""

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from training.test_training import TINY, losses, train

from data_prep import demo_corpus
from data_prep import preprocess as preprocess_cli
from data_prep import tokenizer as tokenizer_cli
from data_prep.bench import run_bench
from data_prep.tokenizer import train_tokenizer
from lws_megatron.config import load_config
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.dataset.tokenizer import HUGGING_FACE, load_tokenizer
from lws_megatron.errors import UserError
from lws_megatron.training.data import resolve_sources


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, training_text) -> str:
    path = tmp_path_factory.mktemp("hf_corpus") / "train.txt"
    path.write_text(training_text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory, corpus) -> str:
    return train_tokenizer([corpus], 600, str(tmp_path_factory.mktemp("hf") / "tok"), fmt="hf").path


def test_byte_level_bpe_trains_byte_identically_and_round_trips(
    tmp_path, corpus, hf_path, sample_docs, capsys
):
    assert (
        tokenizer_cli.main(
            [
                "train",
                "--input",
                corpus,
                "--vocab-size",
                "600",
                "--format",
                "hf",
                "--output",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert "byte-level BPE tokenizer.json, vocabulary 600, eod=0 pad=1" in capsys.readouterr().out
    assert (tmp_path / "again.json").read_bytes() == Path(hf_path).read_bytes()
    tok = load_tokenizer(hf_path)
    assert (tok.kind, tok.vocab_size, tok.eod, tok.pad, tok.unk) == (HUGGING_FACE, 600, 0, 1, None)
    assert all(tok.decode(ids) == doc for ids, doc in zip(tok.encode(sample_docs), sample_docs))
    assert tok.eod not in tok.encode(["a document that says <|endoftext|> in its text"])[0]
    assert tok.encode(["one"], append_eod=True)[0][-1] == 0
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_bytes(Path(hf_path).read_bytes())
    assert load_tokenizer(tmp_path / "model").fingerprint == tok.fingerprint  # a model folder
    with pytest.raises(UserError, match="too small for a byte-level BPE"):
        train_tokenizer([corpus], 100, str(tmp_path / "tiny"), fmt="hf")
    (tmp_path / "broken.json").write_text('{"model": {}}')
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")


def _with_specials(tmp_path: Path, hf_path: str, *names: str) -> str:
    tok = HFTokenizer.from_file(hf_path)
    tok.add_special_tokens([AddedToken(name, special=True) for name in names])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_special_ids_are_read_from_the_tokenizer_never_assumed(
    tmp_path, hf_path, run, write_jsonl, sample_docs
):
    path = _with_specials(tmp_path, hf_path, "</s>")  # now <|endoftext|> and </s>: ambiguous
    source = write_jsonl(tmp_path / "in.jsonl", sample_docs)
    assert load_tokenizer(path).eod is None
    with pytest.raises(
        UserError,
        match=r"several eod candidates \(<\|endoftext\|>, </s>\); "
        "name the right one with --eod-token",
    ):
        run(tmp_path, [source], path, append_eod=True)
    prefix, manifest = run(tmp_path, [source], path, append_eod=True, eod_token="</s>")
    assert manifest.tokenizer.eod_id == 600 and manifest.tokenizer.pad_id == 1
    stored = IndexedDataset(prefix + "_train")
    assert all(stored[i][-1] == 600 for i in range(len(stored)))
    with pytest.raises(UserError, match="--eod-token '<end>' is not a token of"):
        load_tokenizer(path, eod_token="<end>")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<|endoftext|>"})
    )
    configured = load_tokenizer(path)
    assert (configured.eod, configured.pad) == (600, 0)
    data = json.loads(Path(hf_path).read_text())
    data["added_tokens"][0]["content"] = "<|sep|>"
    data["model"]["vocab"]["<|sep|>"] = data["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "plain.json").write_text(json.dumps(data))
    with pytest.raises(
        UserError,
        match=r"has no eod token among its special tokens "
        r"\(<\|sep\|>, <\|padding\|>\); name one with --eod-token",
    ):
        run(tmp_path, [source], str(tmp_path / "plain.json"), name="plain", append_eod=True)


def test_indexing_refuses_a_mismatched_tokenizer(
    tmp_path, hf_path, tok_path, run, write_jsonl, sample_docs
):
    tok = load_tokenizer(hf_path)
    prefix, manifest = run(
        tmp_path,
        [write_jsonl(tmp_path / "in.jsonl", sample_docs * 50)],
        hf_path,
        append_eod=True,
        workers=2,
    )
    stored = IndexedDataset(prefix + "_train")
    assert [list(stored[i]) for i in range(len(stored))] == tok.encode(
        sample_docs * 50, append_eod=True
    )
    assert manifest.tokenizer.sha256 == tok.fingerprint and manifest.dtype == "uint16"
    verify_dataset(prefix, tokenizer_fingerprint=tok.fingerprint, vocab_size=600)
    with pytest.raises(UserError, match="not with .*tok.model"):
        verify_dataset(
            prefix,
            tokenizer_fingerprint=load_tokenizer(tok_path).fingerprint,
            tokenizer_path=tok_path,
        )
    mismatched = load_config(
        TINY, [f"data.path=[{prefix}]", f"data.tokenizer={tok_path}", "model.vocab_size=800"]
    )
    with pytest.raises(UserError, match="was tokenized with .*tok.json"):
        resolve_sources(mismatched)
    wrong_size = load_config(TINY, [f"data.path=[{prefix}]", f"data.tokenizer={hf_path}"])
    with pytest.raises(UserError, match="has 600 tokens but model.vocab_size=512"):
        resolve_sources(wrong_size)


def test_bench_measures_the_tokenizer_json_path(
    tmp_path, hf_path, write_jsonl, sample_docs, capsys
):
    source = write_jsonl(tmp_path / "in.jsonl", sample_docs * 200)
    figures = run_bench([str(source)], hf_path, workers=2, size_mb=0, repeat=1)
    out = capsys.readouterr().out
    assert figures["ratio"] > 0 and "raw encode_batch_fast(docs)" in out and "ratio" in out
    with pytest.raises(UserError, match="has no tools/preprocess_data.py"):
        run_bench([str(source)], hf_path, workers=2, size_mb=0, repeat=1, megatron_lm=str(tmp_path))


@pytest.mark.slow
def test_a_tokenizer_json_indexes_the_demo_corpus_and_trains_a_model(tmp_path):
    assert demo_corpus.main(["--output", str(tmp_path / "corpus")]) == 0
    corpus = sorted(str(p) for p in (tmp_path / "corpus").glob("*.jsonl"))
    assert (
        tokenizer_cli.main(
            [
                "train",
                "--input",
                *corpus,
                "--vocab-size",
                "512",
                "--format",
                "hf",
                "--output",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert (
        preprocess_cli.main(
            [
                "--input",
                *corpus,
                "--tokenizer",
                str(tmp_path / "tok.json"),
                "--output-prefix",
                str(tmp_path / "data"),
                "--append-eod",
                "--valid-fraction",
                "0.05",
                "--quiet",
            ]
        )
        == 0
    )
    data = {"prefix": str(tmp_path / "data"), "tokenizer": str(tmp_path / "tok.json")}
    run_dir, _ = train(
        tmp_path, "hf", 1, data, "model.vocab_size=512", "train.max_steps=6", "eval.interval=0"
    )
    loss = losses(run_dir)
    assert len(loss) == 6 and np.all(np.isfinite(loss)) and loss[-1] < loss[0]

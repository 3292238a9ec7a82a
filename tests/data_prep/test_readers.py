"""Document readers: invalid UTF-8, empty documents, JSON keys, malformed lines, gzip."""

import gzip
import json
import os

import pytest

from data_prep.readers import ReaderOptions
from lws_megatron.errors import UserError


def test_invalid_utf8_is_replaced_counted_and_reported(
    tmp_path, tok_path, tok, run, stored_documents
):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(
        b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "lone \\ud800 surrogate"}\n'
    )
    text = tmp_path / "bad.txt"
    text.write_bytes(b"ok line\nbroken \xc3\x28 pair\n")
    warnings: list[str] = []
    prefix, manifest = run(tmp_path, [jsonl, text], tok_path, warn=warnings.append)
    assert manifest.invalid_utf8 == {"replacements": 3, "documents": 3}
    assert [tok.decode(ids) for ids in stored_documents(prefix + "_train")] == [
        "fine",
        "bad \ufffd byte",
        "lone \ufffd surrogate",
        "ok line",
        "broken \ufffd( pair",
    ]
    assert any(str(jsonl) in w and "line 2" in w for w in warnings)
    assert any(str(text) in w and "line 2" in w for w in warnings)


def test_empty_documents_are_skipped_and_counted(tmp_path, tok_path, run, write_jsonl):
    jsonl = write_jsonl(tmp_path / "e.jsonl", ["one", "", "  \n\t ", "two"])
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    text = tmp_path / "e.txt"
    text.write_text("three\n\n   \nfour\n", encoding="utf-8")
    prefix, manifest = run(tmp_path, [jsonl, text], tok_path)
    assert manifest.splits["train"].documents == 4
    assert manifest.skipped["empty_documents"] == 4


def test_missing_json_key_is_an_error_or_skipped_on_request(tmp_path, tok_path, run):
    source = tmp_path / "k.jsonl"
    source.write_text(
        '{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n{"text": "d"}\n', encoding="utf-8"
    )
    with pytest.raises(
        UserError, match=rf"{source}:3: no key 'text' \(keys: 'body'\).*--skip-missing-key"
    ):
        run(tmp_path, [source], tok_path)
    assert os.listdir(tmp_path) == ["k.jsonl"]
    _, manifest = run(tmp_path, [source], tok_path, options=ReaderOptions(skip_missing_key=True))
    assert manifest.skipped["missing_key"] == 1 and manifest.splits["train"].documents == 3
    _, manifest = run(
        tmp_path,
        [source],
        tok_path,
        "body",
        options=ReaderOptions(json_key="body", skip_missing_key=True),
    )
    assert manifest.splits["train"].documents == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\n{"text": \n', r"k.jsonl:2: not valid JSON"),
        (b'{"text": "a"}\n["text"]\n', r"k.jsonl:2: expected a JSON object"),
        (b'{"text": 3}\n', r"k.jsonl:1: 'text' holds int, not a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, tok_path, content, message, run):
    (tmp_path / "k.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=message):
        run(tmp_path, [tmp_path / "k.jsonl"], tok_path)


def test_gzip_truncated_corrupt_and_multi_member(tmp_path, tok_path, run):
    whole = gzip.compress(
        b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200))
    )
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="cut.jsonl.gz is truncated"):
        run(tmp_path, [truncated], tok_path)
    corrupt = tmp_path / "junk.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match="junk.jsonl.gz is not a valid gzip file"):
        run(tmp_path, [corrupt], tok_path)
    multi = tmp_path / "multi.jsonl.gz"
    multi.write_bytes(whole + gzip.compress(b'{"text": "second member"}\n'))
    _, manifest = run(tmp_path, [multi], tok_path)
    assert manifest.splits["train"].documents == 201

"""data_prep.bench: preprocess against sentencepiece's raw rate."""

from data_prep.bench import run_bench


def test_bench_reports_both_rates_and_their_ratio(
    tmp_path, tok_path, capsys, write_jsonl, sample_docs
):
    source = write_jsonl(tmp_path / "in.jsonl", sample_docs * 200)
    figures = run_bench([str(source)], tok_path, workers=2, size_mb=0, repeat=1)
    out = capsys.readouterr().out
    assert figures["ratio"] > 0 and "raw encode(docs, num_threads=2)" in out and "ratio" in out

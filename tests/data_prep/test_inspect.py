"""python -m data_prep.inspect: statistics, samples and the checks."""

from data_prep import inspect_dataset as inspect_cli


def test_inspect_prints_statistics_and_samples(good_dataset, tok_path, capsys):
    assert inspect_cli.main([good_dataset, "--samples", "2", "--tokenizer", tok_path]) == 0
    out = capsys.readouterr().out
    assert "360 documents" in out and "uint16" in out and "vocabulary 800" in out
    assert "p50" in out and "The quick brown fox" in out
    assert "checks passed" in out and ".bin hashes included" in out

"""The offline demo corpus."""

import json
import sys
from pathlib import Path

from data_prep import demo_corpus


def test_demo_corpus_is_offline_deterministic_and_side_effect_free(tmp_path, capsys):
    assert demo_corpus.main(["--output", str(tmp_path / "a")]) == 0
    first = (tmp_path / "a" / demo_corpus.CORPUS_FILE).read_bytes()
    second = Path(demo_corpus.build_demo_corpus(str(tmp_path / "b"))).read_bytes()
    assert first == second and len(first) > 1_000_000
    texts = [json.loads(line)["text"] for line in first.decode("utf-8").splitlines()]
    assert any(t.startswith("Module json\n") for t in texts)
    assert any(t.startswith("Topic ") for t in texts)
    assert "antigravity" not in sys.modules and "tkinter" not in sys.modules
    assert demo_corpus.main(["--output", str(tmp_path / "a")]) == 2

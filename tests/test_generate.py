"""Generation from a run dir or its export: tokens come out, a seed repeats them, temperature 0
is greedy (each token the argmax of the model's logits)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from export_utils import trained_export

from lws_megatron.errors import UserError
from lws_megatron.generate import export_dir, load, main, sample

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
PROMPT = "The river ran past the"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    return trained_export(tmp_path_factory.mktemp("generate"), tiny_data, "tp1", 1)


@pytest.fixture(scope="module")
def loaded(run):
    return load(run[1])


def test_sampling_repeats_for_a_seed(loaded):
    model, tokenizer = loaded
    first = sample(model, tokenizer, PROMPT, temperature=1.0, max_tokens=12, seed=3)
    assert 1 <= len(first) <= 12 and all(0 <= t < 512 for t in first)
    assert sample(model, tokenizer, PROMPT, temperature=1.0, max_tokens=12, seed=3) == first
    others = [
        sample(model, tokenizer, PROMPT, temperature=1.0, max_tokens=12, seed=s)
        for s in range(4, 8)
    ]
    assert any(o != first for o in others)


def test_temperature_zero_is_greedy(loaded):
    model, tokenizer = loaded
    got = sample(model, tokenizer, PROMPT, temperature=0, max_tokens=8, seed=1)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    want = []
    with torch.no_grad():
        for _ in range(len(got)):
            nxt = int(model(ids).logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert got == want and len(got) >= 1
    assert sample(model, tokenizer, PROMPT, temperature=0, max_tokens=8, seed=2) == got


def test_cli_from_a_run_dir_prints_the_prompt_and_more(run, capsys):
    assert main([str(run[0]), "--prompt", PROMPT, "--max-tokens", "6", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(PROMPT) and len(text.strip()) > len(PROMPT)


def test_bad_requests_fail_in_one_line(run, loaded, tmp_path):
    with pytest.raises(UserError, match="neither a run dir"), export_dir(tmp_path):
        pass
    with pytest.raises(UserError, match="--step applies to a run dir"), export_dir(run[1], 3):
        pass
    with pytest.raises(UserError, match="--top-p"):
        sample(*loaded, PROMPT, top_p=0)

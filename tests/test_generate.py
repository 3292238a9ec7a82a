"""Generation from a run dir or its export: tokens come out, a seed repeats them, temperature 0
is greedy (each token the argmax of the model's logits), the prompt and its continuation decode
as one text, and bad requests or a tampered export fail in one line without running its code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lws_megatron.errors import UserError
from lws_megatron.generate import continuation, main, sample
from lws_megatron.hf.loading import export_dir, load
from tests.helpers.export_utils import trained_export

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The river ran past the"
MARKER = "LWS_TEST_MARKER"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    return trained_export(tmp_path_factory.mktemp("generate"), tiny_data, "tp1", 1)


@pytest.fixture(scope="module")
def loaded(run):
    return load(run[1])


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lws_megatron.generate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


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


def test_continuation_keeps_the_space_after_the_prompt(loaded):
    _, tokenizer = loaded
    word = tokenizer("mill\nwheel").input_ids  # sentencepiece's "▁mill", a newline, "wheel"
    assert continuation(tokenizer, PROMPT, word) == PROMPT + " mill\nwheel"


def test_stdout_holds_the_text_and_nothing_else(run, loaded):
    proc = cli(str(run[1]), "--prompt", PROMPT, "--max-tokens", "6", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tokenizer = loaded
    ids = sample(model, tokenizer, PROMPT, temperature=0, max_tokens=6)
    assert proc.stdout == continuation(tokenizer, PROMPT, ids) + "\n"


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
    for value in ("nan", "inf", "-1"):
        with pytest.raises(UserError, match="--temperature"):
            sample(*loaded, PROMPT, temperature=float(value))


def test_max_tokens_beyond_the_context_is_refused_at_once(run):
    proc = cli(str(run[1]), "--prompt", PROMPT, "--max-tokens", "1000000000", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "context of 32 tokens" in proc.stderr


def test_temperature_nan_is_refused_in_one_line(run):
    proc = cli(str(run[1]), "--prompt", PROMPT, "--temperature", "nan")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--temperature" in proc.stderr


def tampered(run, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(run[1], copy)
    return copy


def planted(path: Path, marker: Path) -> None:
    """Code that leaves `marker` behind if it ever runs."""
    path.write_text(
        path.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    )


def test_edited_modeling_code_is_refused_and_never_runs(run, tmp_path):
    folder, marker = tampered(run, tmp_path, "edited"), tmp_path / MARKER
    planted(folder / "modeling_lws.py", marker)
    with pytest.raises(UserError, match="modeling_lws.py differs from the modeling code"):
        load(folder)
    assert not marker.exists()
    load(folder, trust_remote_code=True)  # the user's explicit choice runs the folder's code
    assert marker.exists()


def test_auto_map_to_another_file_is_refused(run, tmp_path):
    folder, marker = tampered(run, tmp_path, "auto_map"), tmp_path / MARKER
    shutil.copy(folder / "modeling_lws.py", folder / "other.py")
    planted(folder / "other.py", marker)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "other.LWSForCausalLM"
    (folder / "config.json").write_text(json.dumps(config))
    proc = cli(str(folder), "--prompt", PROMPT, "--max-tokens", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "other.py is code lws-megatron does not ship" in proc.stderr
    assert not marker.exists()


def test_tampered_sizes_in_config_json_fail_in_one_line(run, tmp_path):
    folder = tampered(run, tmp_path, "sizes")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_sizes"][1] += 32
    (folder / "config.json").write_text(json.dumps(config))
    proc = cli(str(folder), "--prompt", PROMPT, "--max-tokens", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "does not match model.safetensors: model.layers.1.mlp" in proc.stderr
    config["intermediate_sizes"] = config["intermediate_sizes"][:2]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not describe a model"):
        load(folder)

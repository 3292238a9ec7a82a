"""Export to Hugging Face: the exported model computes our Megatron model's logits (fp32, CPU)
from runs trained at TP=2 (OLMo-2 block, ZeRO-2) and at PP=2, and bad requests fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from export_utils import megatron_logits, trained_export

from data_prep.tokenizer import load_tokenizer
from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.export import export, main

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUNS = {
    "tp2_olmo_zero2": (
        "parallel.tp=2",
        "zero.stage=2",
        "model.norm_placement=post",
        "model.qk_norm=full",
        "model.init=olmo",
    ),
    "pp2": ("parallel.pp=2",),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_data) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("export")
    return {
        name: trained_export(root, tiny_data, name, 2, *overrides)
        for name, overrides in RUNS.items()
    }


@pytest.mark.parametrize("name", sorted(RUNS))
def test_exported_logits_equal_megatron(exports, name):
    run_dir, out = exports[name]
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    [[reference]] = [
        r for r in run_distributed(megatron_logits, 2, str(run_dir), [tokens]) if r[0] is not None
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32
    )
    config = load_config(run_dir / "config.yaml").model
    assert model.config.intermediate_sizes == [64, 128, 192, 256]
    assert model.config.norm_placement == config.norm_placement
    assert model.config.qk_norm == config.qk_norm
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (2, 32, 512)
    torch.testing.assert_close(logits, reference[..., :512], rtol=0, atol=1e-4)


def test_tokenizer_loads_with_the_runs_ids(exports, tiny_data):
    _, out = exports["pp2"]
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours = load_tokenizer(tiny_data["tokenizer"])
    text = "The river ran past the old mill, 42 times."
    assert tok(text).input_ids == ours.processor.encode(text)
    assert (tok.eos_token_id, tok.pad_token_id) == (ours.eod, ours.pad)
    assert tok.decode(tok(text).input_ids) == text


def test_export_refuses_what_it_cannot_export(exports, tmp_path):
    run_dir, out = exports["pp2"]
    with pytest.raises(UserError, match="already exists"):
        export(run_dir, out)
    with pytest.raises(UserError, match="no checkpoint of step 7; it has steps 3"):
        export(run_dir, tmp_path / "a", step=7)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run_dir / "config.yaml", empty)
    with pytest.raises(UserError, match="no complete checkpoint"):
        export(empty, tmp_path / "b")
    zero3 = tmp_path / "zero3"
    shutil.copytree(run_dir / "checkpoints", zero3 / "checkpoints")
    shutil.copy(run_dir / "config.yaml", zero3)
    meta_path = zero3 / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"]["zero_stage"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="ZeRO-3"):
        export(zero3, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_cli_prints_one_line_for_a_user_error(tmp_path, capsys):
    assert main([str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

"""Export to Hugging Face: the exported model computes our Megatron model's logits (fp32, CPU)
from LWS runs trained at TP=2 (OLMo-2 block, ZeRO-2) and at PP=2, and from isotropic runs that
export as stock architectures (no remote code); the tokenizer decodes as the run's; bad requests
fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lws_megatron.config import load_config
from lws_megatron.dataset.tokenizer import load_tokenizer
from lws_megatron.errors import UserError
from lws_megatron.export import export, main
from tests.helpers.dist_utils import run_distributed
from tests.helpers.export_utils import megatron_logits, megatron_reads, trained_export

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

NATIVE = {
    "Olmo2ForCausalLM": ("model.norm_placement=post", "model.qk_norm=full", "model.init=olmo"),
    "Qwen3ForCausalLM": ("model.qk_norm=head",),
    "LlamaForCausalLM": ("model.qk_norm=none", "model.tie_embeddings=true"),
}
ISOTROPIC = (
    "lws.ffn_knots=[3.0]",
    "lws.attn_knots=[1.0]",
    "lws.gqa=fixed_kv",
    "lws.num_kv_heads=2",
)
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


@pytest.fixture(scope="module")
def native_exports(tmp_path_factory, tiny_data) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("native")
    return {
        arch: trained_export(root, tiny_data, arch, 1, *ISOTROPIC, *overrides)
        for arch, overrides in NATIVE.items()
    }


def reference_logits(run_dir: Path, nproc: int, tokens: torch.Tensor) -> torch.Tensor:
    results = run_distributed(megatron_logits, nproc, str(run_dir), [tokens])
    [[reference]] = [r for r in results if r[0] is not None]
    return reference[..., :512]


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_isotropic_run_exports_as_its_stock_architecture(native_exports, arch):
    run_dir, out = native_exports[arch]
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == arch
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads(
        (out / "config.json").read_text()
    )
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits, reference_logits(run_dir, 1, tokens), rtol=0, atol=1e-4)


def test_pipeline_output_has_real_newlines(native_exports):
    _, out = native_exports["Qwen3ForCausalLM"]
    generate = transformers.pipeline("text-generation", model=str(out))
    prompt = "def f(x):\n    return x\n\n"
    text = generate(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and "<0x" not in text


@pytest.mark.parametrize("name", sorted(RUNS))
def test_exported_logits_equal_megatron(exports, name):
    run_dir, out = exports[name]
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = reference_logits(run_dir, 2, tokens)
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
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_megatron_core_reads_our_checkpoints_as_torch_dist(exports, name):
    run_dir, _ = exports[name]
    assert run_distributed(megatron_reads, 1, str(run_dir / "checkpoints" / "step_00000003"))[0]


def test_lws_export_returns_hidden_states_and_attentions(exports):
    _, out = exports["pp2"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32
    )
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = model(tokens, output_hidden_states=True, output_attentions=True)
    assert [h.shape for h in result.hidden_states] == [(1, 16, 64)] * 5
    heads = model.config.layer_num_attention_heads
    assert [a.shape for a in result.attentions] == [(1, h, 16, 16) for h in heads]


def test_tokenizer_loads_with_the_runs_ids(exports, tiny_data):
    _, out = exports["pp2"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(tiny_data["tokenizer"])
    text = "The river ran past the old mill,\n42 times.\n"
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
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir / "checkpoints", damaged / "checkpoints")
    shutil.copy(run_dir / "config.yaml", damaged)
    shard = damaged / "checkpoints" / "step_00000003" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match="__1_0.distcp does not match its recorded sha256"):
        export(damaged, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_cli_prints_one_line_for_a_user_error(tmp_path, capsys):
    assert main([str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

"""The LWS model on Megatron-Core: shapes and parameter counts, attention, refusals, step time.

Checks that need Megatron's process groups run in one spawned single-process gloo world
(`_single_rank_checks`); the refusals that must come before any process group run here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lws_megatron.config import Config, load_config
from lws_megatron.errors import UserError
from lws_megatron.training.distributed import model_parallel, resolve_plan
from tests.helpers import TINY
from tests.helpers.dist_utils import built_model, run_distributed

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    str(p.relative_to(ROOT))
    for family in ("paper", "openelm", "demo")
    for p in (ROOT / "configs" / family).glob("*.yaml")
    if not p.name.startswith("_")
)
DEMO = str(ROOT / "configs" / "demo" / "vanilla.yaml")


def _with(config: Config, **parallel) -> Config:
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, **parallel))


def _reference_attention(q, k, v, scale=None):
    """Plain causal grouped-query attention: [s, b, h, d] in, [s, b, h * d] out."""
    s, b, h, d = q.shape
    group = h // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * (scale or 1 / math.sqrt(d))
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, h * d)


def _attention_errors() -> dict[str, float]:
    """SDPAttention against the plain reference: GQA, MHA, a custom scale."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lws_megatron.model import SDPAttention

    with model_parallel(load_config(DEMO)):  # TP=1 groups, which SDPAttention reads
        return _attention_errors_in_groups(SDPAttention, AttnMaskType, TransformerConfig)


def _attention_errors_in_groups(SDPAttention, AttnMaskType, TransformerConfig) -> dict:
    errors = {}
    g = torch.Generator().manual_seed(0)
    for name, heads, kv, scale in (("gqa", 6, 2, None), ("mha", 4, 4, None), ("scaled", 4, 2, 0.3)):
        config = TransformerConfig(
            num_layers=1,
            hidden_size=16 * heads,
            num_attention_heads=heads,
            num_query_groups=kv,
            kv_channels=16,
            attention_dropout=0.0,
        )
        attention = SDPAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=scale)
        q = torch.randn(12, 3, heads, 16, generator=g)
        k, v = (torch.randn(12, 3, kv, 16, generator=g) for _ in range(2))
        for kernel in ("auto", "flash", "math"):  # model.sdpa_kernel; the others need CUDA
            attention.kernel = kernel
            error = attention(q, k, v, None) - _reference_attention(q, k, v, scale)
            errors[f"{name} {kernel}"] = error.abs().max().item()
    return errors


def _te_attention_error() -> float:
    """SDPAttention against Transformer Engine's core attention on CUDA in bf16."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lws_megatron.model import SDPAttention

    with model_parallel(load_config(DEMO)):
        return _te_error_in_groups(
            SDPAttention, TEDotProductAttention, AttnMaskType, TransformerConfig
        )


def _te_error_in_groups(
    SDPAttention, TEDotProductAttention, AttnMaskType, TransformerConfig
) -> float:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=96,
        num_attention_heads=6,
        num_query_groups=2,
        kv_channels=16,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    te = TEDotProductAttention(config, 1, AttnMaskType.causal, "self")
    sdpa = SDPAttention(config, 1, AttnMaskType.causal, "self")
    q = torch.randn(64, 2, 6, 16, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(64, 2, 2, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return (te(q, k, v, None).float() - sdpa(q, k, v, None).float()).abs().max().item()


def _shapes_by_layer(model) -> list[tuple[int, int, int]]:
    """(ffn, query heads, KV heads) of each built layer, read off the module shapes."""
    out = []
    for layer in model.decoder.layers:
        attention, d_head = layer.self_attention, layer.config.kv_channels
        q = attention.linear_proj.weight.shape[1] // d_head
        kv = (attention.linear_qkv.weight.shape[0] // d_head - q) // 2
        out.append((layer.mlp.linear_fc2.weight.shape[1], q, kv))
    return out


def _shipped_configs() -> dict[str, dict]:
    """Each shipped config built on the meta device: parameter count and per-layer shapes."""
    from lws_megatron.describe import describe_json
    from lws_megatron.model import trainable_parameter_count

    out = {}
    for path in SHIPPED:
        config = load_config(ROOT / path)
        with built_model(config, "meta") as model:
            described = describe_json(path, config, 1)
            out[path] = {
                "built": trainable_parameter_count([model]),
                "described": described["total_params"],
                "layers": _shapes_by_layer(model),
                "expected_layers": [
                    (x["ffn_hidden_size"], x["num_query_heads"], x["num_kv_heads"])
                    for x in described["layers"]
                ],
                "devices": {p.device.type for p in model.parameters()},
            }
    return out


def _refused_batches() -> dict[str, tuple[str, int]]:
    """Bad batches through forward_step on the demo model: the error, and forwards that ran."""
    from lws_megatron.model import ModelArgs
    from lws_megatron.training.forward import forward_step

    config = load_config(DEMO)
    with built_model(config) as model:
        return _refusals(config, model, forward_step(ModelArgs.from_config(config, layout=None)))


def _refusals(config, model, step) -> dict[str, tuple[str, int]]:
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    b, s, vocab = 2, config.model.seq_length, config.model.vocab_size
    ok = torch.zeros(b, s, dtype=torch.long)
    bad = {
        "too_long": torch.zeros(b, s + 1, dtype=torch.long),
        "id_beyond_vocab": torch.full((b, s), vocab),
    }
    out = {}
    for name, tokens in bad.items():
        labels = tokens if tokens.shape != ok.shape else ok
        batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(labels.shape)}
        try:
            step(iter([batch]), model)
            out[name] = ("no error", len(forwards))
        except UserError as err:
            out[name] = (str(err), len(forwards))
    return out


def _pinned_kernels() -> dict:
    """The tiny model with model.sdpa_kernel pinned: loss and gradients against auto, the
    compiled graph, and the refusal of a CUDA-only kernel here."""
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    out, reference = {}, None
    for kernel in ("auto", "flash", "math", "cudnn"):
        config = load_config(TINY, [f"model.sdpa_kernel={kernel}"])
        try:
            with built_model(config) as model:
                reference = _kernel_run(model, kernel, tokens, out, reference)
        except UserError as err:
            out[kernel] = str(err)
    return out


def _kernel_run(model, kernel: str, tokens, out: dict, reference):
    """One kernel's loss and gradients into `out`, against the first kernel's (the reference)."""
    import torch._dynamo

    loss = model(tokens, None, None, labels=tokens).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = reference or (loss.item(), grads)
    out[kernel] = {
        "loss": abs(loss.item() - reference[0]),
        "grads": (grads - reference[1]).abs().max().item(),
    }
    if kernel == "flash":
        e = torch._dynamo.explain(model)(tokens, None, None, labels=tokens)
        out["flash graphs"] = (e.graph_count, e.graph_break_count)
    return reference


def _single_rank_checks() -> dict:
    return {
        "attention": _attention_errors(),
        "kernels": _pinned_kernels(),
        "shipped": _shipped_configs(),
        "refused": _refused_batches(),
    }


@pytest.fixture(scope="module")
def single_rank() -> dict:
    # The CPU path (SDPA, the CUDA bridges) also on a machine with a GPU.
    (result,) = run_distributed(_single_rank_checks, 1, threads=2, env={"CUDA_VISIBLE_DEVICES": ""})
    return result


# --- in the spawned process ---------------------------------------------------------------


def test_sdpa_attention_matches_plain_reference(single_rank):
    for name, error in single_rank["attention"].items():
        assert error < 1e-5, f"{name}: SDPA differs from the reference by {error:.2e}"


def test_a_pinned_sdpa_kernel_computes_the_same_model_in_one_graph(single_rank):
    kernels = single_rank["kernels"]
    for kernel in ("flash", "math"):
        assert kernels[kernel]["loss"] < 1e-5 and kernels[kernel]["grads"] < 1e-5, kernels
    assert kernels["flash graphs"] == (1, 0)  # sdpa_kernel traced into the graph, no break
    assert kernels["cudnn"].startswith("model.sdpa_kernel=cudnn needs a CUDA device")


def test_a_kernel_that_cannot_run_the_heads_is_refused_naming_them():
    from lws_megatron.model.attention import check_kernel

    with pytest.raises(
        UserError,
        match="sdpa_kernel=flash cannot run attention with 6 query "
        "and 4 KV heads of size 16 in float32 on cpu",
    ):
        check_kernel("flash", {(6, 2), (6, 4)}, 16, 32, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
def test_te_attention_matches_sdpa_where_both_run():
    from lws_megatron.model.spec import transformer_engine_usable

    if not transformer_engine_usable():
        pytest.skip("Transformer Engine needs CUDA and the transformer_engine package")
    (error,) = run_distributed(_te_attention_error, 1)
    assert error < 2e-2  # bf16


@pytest.mark.parametrize("path", SHIPPED)
def test_built_parameters_equal_describe(single_rank, path):
    shipped = single_rank["shipped"][path]
    assert shipped["devices"] == {"meta"}, "large configs must build without allocating weights"
    assert shipped["built"] == shipped["described"]
    assert shipped["layers"] == shipped["expected_layers"]


@pytest.mark.parametrize("case", ["too_long", "id_beyond_vocab"])
def test_bad_batch_refused_before_compute(single_rank, case):
    message, forwards = single_rank["refused"][case]
    assert forwards == 0, f"{case}: the model ran before the batch was refused"
    assert ("model.seq_length" if case == "too_long" else "model.vocab_size") in message


# --- in this process: refusals before any process group ----------------------------------


def test_tp_the_heads_cannot_take_is_refused_before_process_groups():
    from lws_megatron.model import ModelArgs

    config = _with(load_config(DEMO), tp=4)  # fixed_kv keeps 2 KV heads in every layer
    for call in (
        lambda: resolve_plan(config, 4),
        lambda: ModelArgs.from_config(config, layout=None),
    ):
        with pytest.raises(UserError, match=r"layer 0 .*TP=4"):
            call()
    assert not dist.is_initialized()


def test_uneven_split_without_layout_is_refused():
    with pytest.raises(UserError, match=r"num_layers=10 .*pp=3.*'Et\*4\|t\*3\|t\*3L'"):
        resolve_plan(_with(load_config(DEMO), pp=3), 3)


@pytest.mark.parametrize(
    "layout",
    ["Et*3|t*5L", "t*5|t*5L", "Et*5|t*5", "Et*5|t*5|L"],
    ids=["count", "no-E", "no-L", "stages"],
)
def test_bad_layout_is_refused(layout):
    with pytest.raises(UserError, match="parallel.pipeline_layout"):
        resolve_plan(_with(load_config(DEMO), pp=2, pipeline_layout=layout), 2)


def test_explicit_layout_is_taken_as_given():
    config = load_config(DEMO)
    assert resolve_plan(_with(config, pp=2, pipeline_layout="Et*3|t*7L"), 2).layout == "Et*3|t*7L"
    assert resolve_plan(_with(config, pp=2), 2).layout is None  # Megatron's even split


def test_auto_layout_asks_the_planner(monkeypatch):
    from lws_megatron.training import distributed

    config = _with(load_config(DEMO), pp=2, pipeline_layout="auto")
    monkeypatch.setattr(distributed, "plan_layout", lambda c: "Et*4|t*6L" if c is config else "")
    assert resolve_plan(config, 2).layout == "Et*4|t*6L"


def test_check_batch():
    from lws_megatron.model import check_batch

    config = load_config(DEMO)
    s, vocab = config.model.seq_length, config.model.vocab_size
    check_batch(torch.randint(0, vocab, (2, s)), vocab, s, torch.randint(0, vocab, (2, s)))
    for tokens, match in (
        (torch.zeros(2, s + 1, dtype=torch.long), "longer than model.seq_length"),
        (torch.full((2, s), vocab), f"token id {vocab} .*model.vocab_size"),
        (torch.full((2, s), -1), "token id -1"),
        (torch.zeros(2, s), "integer ids"),
    ):
        with pytest.raises(UserError, match=match):
            check_batch(tokens, vocab, s)
    with pytest.raises(UserError, match="labels"):
        check_batch(torch.zeros(2, s, dtype=torch.long), vocab, s, torch.full((2, s), vocab))


def test_attention_backend_choice():
    from lws_megatron.model.spec import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(UserError, match="attention_backend=te"):
        resolve_backend("te", cpu)

"""The paper's OLMo-2 block: a plain-PyTorch reference, TP/PP invariance, init, weight decay,
parameter counts.

The reference below is written from the OLMo-2 description, not from Megatron: its own RMSNorm,
full-width QK-norm, RoPE on the two halves of each head, grouped-query causal attention with an
explicit mask, SwiGLU, norms after each sublayer inside the residual, a final norm and the head.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_compile import _explain_layer_and_model
from test_model_parallel import TINY_YAML, _assert_same, _merge, _train_step, _with_parallel

from lws_megatron.config import load_config
from lws_megatron.describe import describe_json
from lws_megatron.planner.costs import cost_model
from lws_megatron.training.param_groups import param_groups
from tests.helpers.dist_utils import built_model, run_distributed

ROOT = Path(__file__).resolve().parents[2]
OLMO = ["model.norm_placement=post", "model.qk_norm=full", "model.init=olmo"]
ONE_LAYER = ["model.num_layers=1", "lws.ffn_knots=[2.0]", "lws.attn_knots=[0.5]"]
TOLERANCE = 1e-5
PAPER_TOTALS = {
    "baseline-12l": 181_107_456,
    "baseline-18l": 183_477_504,
    "vanilla-18l": 179_742_976,
    "framed-18l": 179_350_272,
    "reverse-18l": 179_350_272,
    "crown-18l": 181_906_688,
}


def _rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """[b, h, s, d]: rotate the pairs (i, i + d/2) by position * theta^(-2i/d)."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, query head h reading KV head h // (heads / kv heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[-2]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def reference_loss(w: dict[str, torch.Tensor], config, tokens, labels) -> torch.Tensor:
    """Mean next-token loss of the OLMo-2 block stack with weights `w` (Megatron's names)."""
    m = config.model
    eps, dh = m.norm_eps, m.d_head
    b, s = tokens.shape
    x = w["embedding.word_embeddings.weight"][tokens]
    for i, shape in enumerate(config.summary(1).layers):
        p = f"decoder.layers.{i}."
        heads, kv = shape.num_query_heads, shape.num_kv_heads
        # Megatron stores q, k, v interleaved per KV group: [q heads of the group, k, v].
        qkv = w[p + "self_attention.linear_qkv.weight"].view(kv, (heads // kv + 2) * dh, -1)
        wq, wk, wv = qkv.split([heads // kv * dh, dh, dh], dim=1)
        q = _rms(x @ wq.reshape(heads * dh, -1).T, w[p + "self_attention.q_layernorm.weight"], eps)
        k = _rms(x @ wk.reshape(kv * dh, -1).T, w[p + "self_attention.k_layernorm.weight"], eps)
        v = x @ wv.reshape(kv * dh, -1).T
        q, k, v = (t.view(b, s, -1, dh).transpose(1, 2) for t in (q, k, v))
        out = _attention(_rope(q, m.rope_theta), _rope(k, m.rope_theta), v)
        out = out.transpose(1, 2).reshape(b, s, heads * dh)
        out = out @ w[p + "self_attention.linear_proj.weight"].T
        x = x + _rms(out, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = w[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out = (F.silu(x @ gate.T) * (x @ up.T)) @ w[p + "mlp.linear_fc2.weight"].T
        x = x + _rms(out, w[p + "post_mlp_layernorm.weight"], eps)
    logits = _rms(x, w["decoder.final_layernorm.weight"], eps) @ w["output_layer.weight"].T
    return F.cross_entropy(logits.reshape(b * s, -1), labels.reshape(-1))


def _single_rank(path: str, cases: dict[str, list[str]]) -> dict:
    """Per case: Megatron's weights, loss and gradients at TP=1 on one batch; init statistics;
    which parameter lands in which weight-decay group."""
    out = {}
    for name, overrides in cases.items():
        config = load_config(path, overrides)
        with built_model(config) as model:
            out[name] = _one_case(config, model)
    return out


def _one_case(config, model) -> dict:
    from lws_megatron.model import global_named_parameters

    g = torch.Generator().manual_seed(3)
    shape = (config.train.micro_batch_size, config.model.seq_length)
    tokens = torch.randint(0, config.model.vocab_size, shape, generator=g)
    labels = torch.randint(0, config.model.vocab_size, shape, generator=g)
    loss = model(tokens, None, None, labels=labels).mean()
    loss.backward()
    named = dict(global_named_parameters(model))
    return {
        "loss": loss.item(),
        "tokens": tokens,
        "labels": labels,
        "weights": {n: p.detach().clone() for n, p in named.items()},
        "grads": {n: p.grad.clone() for n, p in named.items()},
        "groups": {
            tuple(sorted(no_decay)): [
                sorted(
                    n for n, p in model.named_parameters() if any(p is q for q in group["params"])
                )
                for group in param_groups(model, 0.1, no_decay)
            ]
            for no_decay in (
                ["embeddings"],
                ["embeddings", "output_head"],
                ["norms", "biases", "embeddings"],
            )
        },
    }


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("olmo") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)


@pytest.fixture(scope="module")
def single(tiny_path) -> dict:
    cases = {
        "one_layer": OLMO + ONE_LAYER,
        "lws": OLMO,
        "megatron_init": [],
        "big_olmo": OLMO + ["model.d_model=512", "model.d_head=64"],
    }
    (result,) = run_distributed(_single_rank, 1, tiny_path, cases)
    return result


@pytest.mark.parametrize("case", ["one_layer", "lws"])
def test_megatron_model_matches_the_plain_pytorch_olmo2_block(single, tiny_path, case):
    got = single[case]
    config = load_config(tiny_path, OLMO + (ONE_LAYER if case == "one_layer" else []))
    if case == "lws":  # a real LWS stack: every layer has its own FFN width and head counts
        assert len(set(config.summary(1).layers)) == config.model.num_layers == 4
    weights = {n: t.clone().requires_grad_() for n, t in got["weights"].items()}
    loss = reference_loss(weights, config, got["tokens"], got["labels"])
    loss.backward()
    assert abs(loss.item() - got["loss"]) <= TOLERANCE
    assert weights.keys() == got["grads"].keys()
    for name, tensor in weights.items():
        diff = (tensor.grad - got["grads"][name]).abs().max().item()
        assert diff <= TOLERANCE, f"{case}: gradient of {name} differs by {diff:.2e}"


def test_olmo_init_is_a_3_sigma_truncated_normal_without_depth_scaling(single):
    weights = single["big_olmo"]["weights"]
    std = 0.02
    matrices = {n: t for n, t in weights.items() if t.dim() == 2}
    assert {n.rsplit(".", 2)[-2] for n in matrices} >= {
        "word_embeddings",
        "linear_qkv",
        "linear_proj",
        "linear_fc1",
        "linear_fc2",
        "output_layer",
    }
    for name, tensor in matrices.items():
        assert tensor.abs().max().item() <= 3 * std, name
        # A normal cut at 3 sigma keeps 98.66% of sigma; no layer is scaled by depth.
        assert tensor.std().item() == pytest.approx(0.9866 * std, rel=0.05), name
    everything = torch.cat([t.flatten() for t in matrices.values()])
    assert everything.std().item() == pytest.approx(0.9866 * std, rel=0.005)
    assert everything.abs().max().item() > 2.99 * std  # the cut, not a narrower distribution
    assert all((t == 1).all() for t in weights.values() if t.dim() == 1)


def test_megatron_init_still_scales_output_projections_by_depth(single):
    weights = single["megatron_init"]["weights"]
    fc2 = torch.cat([t.flatten() for n, t in weights.items() if n.endswith("linear_fc2.weight")])
    qkv = torch.cat([t.flatten() for n, t in weights.items() if n.endswith("linear_qkv.weight")])
    assert fc2.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert qkv.std().item() == pytest.approx(0.02, rel=0.05)
    assert qkv.abs().max().item() > 3 * 0.02  # untruncated


def test_paper_weight_decay_spares_only_the_input_embedding(single):
    groups = single["lws"]["groups"]
    decayed, plain = groups[("embeddings",)]
    assert plain == ["embedding.word_embeddings.weight"]
    assert "output_layer.weight" in decayed and "decoder.final_layernorm.weight" in decayed
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in decayed
    assert "decoder.layers.3.post_mlp_layernorm.weight" in decayed
    _, plain = groups[("embeddings", "output_head")]
    assert plain == ["embedding.word_embeddings.weight", "output_layer.weight"]
    decayed, plain = groups[("biases", "embeddings", "norms")]
    assert all(
        n.endswith(
            ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        )
        or n == "output_layer.weight"
        for n in decayed
    )
    assert len(plain) == 1 + 4 * 4 + 1  # embedding, 4 norms per layer, final norm


def _layouts_and_groups(configs: dict, tied) -> tuple[dict, list[str]]:
    """Every layout's train step (test_model_parallel's), then the parameters a tied model split
    over two pipeline stages spares from weight decay under the paper's set."""
    steps = {name: _train_step(config) for name, config in configs.items()}
    with built_model(tied) as model:
        spared = [
            p for group in param_groups(model, 0.1, ["embeddings"])[1:] for p in group["params"]
        ]
        names = sorted(n for n, p in model.named_parameters() if any(p is q for q in spared))
    return steps, names


@pytest.fixture(scope="module")
def layouts(tiny_path) -> dict:
    base = load_config(tiny_path, OLMO)
    configs = {
        name: _with_parallel(base, *split)
        for name, split in {
            "tp1pp1": (1, 1, ""),
            "tp2": (2, 1, ""),
            "tp2pp2": (2, 2, "Et*3|tL"),
        }.items()
    }
    tied = _with_parallel(load_config(tiny_path, OLMO + ["model.tie_embeddings=true"]), 1, 2, "")
    per_rank = run_distributed(
        _layouts_and_groups, 4, configs, tied, env={"CUDA_VISIBLE_DEVICES": ""}
    )
    merged = {name: _merge([steps[name] for steps, _ in per_rank]) for name in configs}
    return {**merged, "tied_spared": [names for _, names in per_rank]}


@pytest.mark.slow
def test_a_tied_head_on_the_last_stage_is_spared_with_the_embedding(layouts):
    # Ranks 0, 1: first stage (two data-parallel replicas); ranks 2, 3: last stage.
    assert (
        layouts["tied_spared"]
        == [["embedding.word_embeddings.weight"]] * 2 + [["output_layer.weight"]] * 2
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2pp2"])
def test_full_qk_norm_gives_the_same_loss_and_gradients_at_any_tp_and_pp(layouts, layout):
    _assert_same(layouts, layout, "tp1pp1")
    gain = layouts[layout]["weights"]["decoder.layers.3.self_attention.q_layernorm.weight"]
    assert gain.shape == (16 * 8,)  # the whole q projection: 16 heads x d_head 8


def test_describe_gives_the_paper_codes_parameter_counts():
    totals = {}
    for path in sorted((ROOT / "configs" / "paper").glob("[!_]*.yaml")):
        config = load_config(path)
        assert (config.model.norm_placement, config.model.qk_norm, config.model.init) == (
            "post",
            "full",
            "olmo",
        )
        assert config.optim.no_decay == ["embeddings"]
        totals[path.stem] = describe_json(path.stem, config, 1)["total_params"]
        planned = cost_model(config, pp=1)
        blocks = [*planned.layers, planned.embedding, planned.output]
        assert sum(b.params for b in blocks) == totals[path.stem]
    assert totals == {**PAPER_TOTALS, "vanilla-12l": 178_751_232}


def test_vanilla_12l_has_the_papers_profile():
    config = load_config(ROOT / "configs" / "paper" / "vanilla-12l.yaml")
    assert config.model.num_layers == 12
    assert config.lws.ffn_knots == (2.0, 5.3) and config.lws.attn_knots == (0.5, 2.0)
    layers = config.summary(1).layers
    assert layers[0].ffn_hidden_size < layers[-1].ffn_hidden_size
    assert layers[0].num_query_heads < layers[-1].num_query_heads


@pytest.mark.slow
def test_the_olmo_block_compiles_to_single_graphs_on_every_tp_rank(tmp_path):
    path = tmp_path / "tiny_olmo.yaml"
    path.write_text(
        f"base: {ROOT / 'tests' / 'configs' / 'tiny.yaml'}\n"
        "model: {norm_placement: post, qk_norm: full, init: olmo}\n"
    )
    for rank, found in enumerate(run_distributed(_explain_layer_and_model, 2, str(path), [])):
        assert found and all(v == (1, 0) for v in found.values()), (rank, found)

"""A checkpoint's weights as one TP=1, PP=1 state dict, and under the LWS export's names.

The checkpoint's model-state files (one per pipeline stage and TP rank, `module` holding the
chunk's state dict) are read with `checkpoint.safe_load`, without a process group: TP shards are
merged along each parameter's partition dim (and stride: SwiGLU's fc1 holds [gate; up] per
rank), each stage's layers take their global numbers from the pipeline layout, and the fused
QKV projection is unpacked from Megatron's per-group [q..., k, v] order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import (
    PipelineParallelLayerLayout,
)
from tqdm import tqdm

from lws_megatron.config import Config
from lws_megatron.errors import UserError
from lws_megatron.fileio import sha256_file
from lws_megatron.training.checkpoint import safe_load

# Megatron's tensor-parallel split of each parameter, by name suffix: (partition dim, stride).
# Parameters not listed are replicated over TP.
_SPLIT = {
    "word_embeddings.weight": (0, 1),
    "output_layer.weight": (0, 1),
    "linear_qkv.weight": (0, 1),
    "linear_proj.weight": (1, 1),
    "linear_fc1.weight": (0, 2),
    "linear_fc2.weight": (1, 1),
}
_FULL_QK_NORM = {"q_layernorm.weight": (0, 1), "k_layernorm.weight": (0, 1)}


def _stage_offsets(num_layers: int, pp: int, layout: str | None) -> dict[tuple[int, int], int]:
    """{(pipeline rank, virtual stage): global index of that chunk's first layer}."""
    if layout is None:
        return {(p, 0): p * (num_layers // pp) for p in range(pp)}
    stages = PipelineParallelLayerLayout(layout, pp).layout
    vpp, offsets, seen = len(stages[0]), {}, 0
    for v in range(vpp):
        for p in range(pp):
            offsets[(p, v)] = seen
            seen += stages[p][v].count(LayerType.decoder)
    return offsets


def _merge(
    name: str, shards: list[torch.Tensor], split: dict[str, tuple[int, int]]
) -> torch.Tensor:
    """The TP=1 tensor from every TP rank's shard, undoing Megatron's (strided) split."""
    rule = next((rule for suffix, rule in split.items() if name.endswith(suffix)), None)
    if rule is None or len(shards) == 1:
        return shards[0]
    dim, stride = rule
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([piece[j] for j in range(stride) for piece in pieces], dim=dim)


def megatron_state(checkpoint: Path, config: Config) -> dict[str, torch.Tensor]:
    """The whole model's weights under Megatron's TP=1, PP=1 names, from a checkpoint dir."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    fingerprint = meta["fingerprint"]
    tp, pp, layout = fingerprint["tp"], fingerprint["pp"], fingerprint["pipeline_layout"]
    if fingerprint.get("zero_stage") == 3:
        raise UserError(
            f"{checkpoint} is a ZeRO-3 checkpoint, whose weights are partitioned "
            "over data-parallel ranks; export supports ZeRO 0-2 runs (retrain or "
            "resume with zero.stage=2 and save a checkpoint)"
        )
    split = {**_SPLIT, **(_FULL_QK_NORM if config.model.qk_norm == "full" else {})}
    offsets = _stage_offsets(config.model.num_layers, pp, layout)
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=pp * tp, desc="reading the checkpoint", unit="file", disable=None)
    for p in range(pp):
        shards: dict[str, list[torch.Tensor]] = {}
        for t in range(tp):
            rel = f"pp{p}/state/mp_rank_{t:02d}_model_states.pt"
            _check_file(checkpoint, rel, meta["files"])
            module = safe_load(checkpoint / rel, map_location="cpu")["module"]
            bar.update()
            for key, value in module.items():
                if isinstance(value, torch.Tensor):
                    shards.setdefault(key, []).append(value)
        for key, parts in shards.items():
            chunk, _, rest = key.partition(".")  # "1.decoder...": a virtual stage's chunk
            vp, name = (int(chunk), rest) if chunk.isdigit() else (0, key)
            if name.startswith("decoder.layers."):
                _, _, index, rest = name.split(".", 3)
                name = f"decoder.layers.{offsets[(p, vp)] + int(index)}.{rest}"
            state.setdefault(name, _merge(name, parts, split).float())
    bar.close()
    return state


def _check_file(checkpoint: Path, rel: str, files: dict) -> None:
    if not (checkpoint / rel).is_file():
        raise UserError(
            f"{checkpoint / rel} is missing; the checkpoint is incomplete, export "
            "another step with --step"
        )
    if sha256_file(checkpoint / rel) != files.get(rel, {}).get("sha256"):
        raise UserError(
            f"{checkpoint / rel} does not match the sha256 in meta.json; the "
            "checkpoint is damaged, export another step with --step"
        )


def hf_state(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Megatron's TP=1 state dict under the export's names, cut to the tokenizer's vocabulary."""
    m, vocab = config.model, config.model.vocab_size
    layers = config.summary().layers
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab]
    # Megatron's layer norms (local spec, and TE's norms fused into the next linear) -> ours.
    norms = (
        {
            "post_attention_layernorm.weight": "post_attention_norm",
            "post_mlp_layernorm.weight": "post_mlp_norm",
        }
        if m.norm_placement == "post"
        else {
            "input_layernorm.weight": "input_norm",
            "self_attention.linear_qkv.layer_norm_weight": "input_norm",
            "pre_mlp_layernorm.weight": "pre_mlp_norm",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_norm",
        }
    )
    for i, shape in enumerate(layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        groups = shape.num_kv_heads
        per_group = shape.num_query_heads // groups
        qkv = state[src + "self_attention.linear_qkv.weight"]
        qkv = qkv.view(groups, per_group + 2, m.d_head, m.d_model)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, m.d_model)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, m.d_model)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, m.d_model)
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        if m.qk_norm != "none":
            for qk in ("q", "k"):
                weight = state[src + f"self_attention.{qk}_layernorm.weight"]
                heads = shape.num_query_heads if qk == "q" else groups
                full = m.qk_norm == "full"
                out[dst + f"self_attn.{qk}_norm.weight"] = (
                    weight.view(heads, m.d_head) if full else weight
                )
        for megatron, ours in norms.items():
            if src + megatron in state:
                out[dst + ours + ".weight"] = state[src + megatron]
    return {k: v.contiguous() for k, v in out.items()}

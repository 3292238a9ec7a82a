"""`python -m lws_megatron.export RUN_DIR [--step N] --output DIR`: a checkpoint as a Hugging Face
model dir that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads.

The checkpoint's model-state files (one per pipeline stage and TP rank, `module` holding the
chunk's state dict) are read with `checkpoint.safe_load`, without a process group: TP shards are
merged along each parameter's partition dim (and stride: SwiGLU's fc1 holds [gate; up] per
rank), each stage's layers take their global numbers from the pipeline layout, and the fused
QKV projection is unpacked from Megatron's per-group [q..., k, v] order. The dir holds
`model.safetensors`, `config.json` (per-layer sizes, every block option, `auto_map`), the
modeling code (`lws_megatron/hf/`) and the run's tokenizer; it is written as `DIR.partial` and
renamed, so a crash never leaves a half export.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import (
    PipelineParallelLayerLayout,
)

from data_prep.tokenizer import load_tokenizer
from lws_megatron.config import Config, load_config
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import os_errors, sha256_file, write_json_atomic
from lws_megatron.training.checkpoint import checkpoint_step, safe_load

HF_CODE = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_lws.py", "modeling_lws.py")
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


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The run's checkpoint at `step` (default: the newest complete one)."""
    root = run_dir / "checkpoints"
    found = {checkpoint_step(p): p for p in root.iterdir()} if root.is_dir() else {}
    found.pop(None, None)
    if not found:
        raise UserError(
            f"{run_dir} has no complete checkpoint under checkpoints/; export a run "
            "that saved one (checkpoint.interval, or the save at the end of training)"
        )
    if step is None:
        return found[max(found)]
    if step not in found:
        raise UserError(
            f"{run_dir} has no checkpoint of step {step}; it has steps "
            f"{', '.join(map(str, sorted(found)))}: pass one of them to --step"
        )
    return found[step]


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
    for p in range(pp):
        shards: dict[str, list[torch.Tensor]] = {}
        for t in range(tp):
            rel = f"pp{p}/state/mp_rank_{t:02d}_model_states.pt"
            _check_file(checkpoint, rel, meta["files"])
            module = safe_load(checkpoint / rel, map_location="cpu")["module"]
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


def hf_config(config: Config, tokenizer_ids: dict[str, int | None]) -> dict:
    m = config.model
    layers = config.summary().layers
    return {
        "architectures": ["LWSForCausalLM"],
        "model_type": "lws",
        "auto_map": {
            "AutoConfig": "configuration_lws.LWSConfig",
            "AutoModelForCausalLM": "modeling_lws.LWSForCausalLM",
        },
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "head_dim": m.d_head,
        "intermediate_sizes": [s.ffn_hidden_size for s in layers],
        "layer_num_attention_heads": [s.num_query_heads for s in layers],
        "layer_num_key_value_heads": [s.num_kv_heads for s in layers],
        "num_hidden_layers": m.num_layers,
        "norm_placement": m.norm_placement,
        "qk_norm": m.qk_norm,
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.norm_eps,
        "max_position_embeddings": m.seq_length,
        "tie_word_embeddings": m.tie_embeddings,
        "dtype": "float32",
        **tokenizer_ids,
    }


def tokenizer_files(config: Config, run_dir: Path, output: Path) -> dict[str, int | None]:
    """Copy the run's tokenizer (sentencepiece `.model` or `tokenizer.json`) into `output`
    with a `tokenizer_config.json` that AutoTokenizer loads; return its special ids."""
    path = Path(config.data.tokenizer)
    if not path.is_file():
        raise UserError(
            f"{run_dir / 'config.yaml'}: data.tokenizer={path} does not exist; put "
            "the run's tokenizer back there to export it"
        )
    info = run_dir / "run_info.json"
    trained = json.loads(info.read_text()).get("tokenizer_sha256") if info.is_file() else None
    if trained is not None and sha256_file(path) != trained:
        raise UserError(
            f"{path} is not the tokenizer this run trained with (sha256 differs "
            f"from {info}); restore the original file"
        )
    tok = load_tokenizer(path)
    ids = {"eos_token_id": tok.eod, "pad_token_id": tok.pad, "bos_token_id": tok.bos}
    if path.suffix == ".model":
        shutil.copyfile(path, output / "spiece.model")
        name = tok.processor.id_to_piece
        # BertGenerationTokenizer is transformers' plain sentencepiece tokenizer: it encodes
        # with the .model itself (the same ids as data_prep) and adds no special tokens.
        settings = {"tokenizer_class": "BertGenerationTokenizer", "sep_token": None}
    else:
        from tokenizers import Tokenizer

        shutil.copyfile(path, output / "tokenizer.json")
        name = Tokenizer.from_file(str(path)).id_to_token
        settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    specials = {
        "eos_token": tok.eod,
        "pad_token": tok.pad,
        "bos_token": tok.bos,
        "unk_token": getattr(tok, "unk", None),
    }
    settings.update({key: None if i is None else name(i) for key, i in specials.items()})
    settings["model_max_length"] = config.model.seq_length
    write_json_atomic(output / "tokenizer_config.json", settings)
    return ids


def export(run_dir: Path, output: Path, step: int | None = None) -> Path:
    """Write the export of `run_dir`'s checkpoint (default: the newest) to `output`."""
    from safetensors.torch import save_file

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no config.yaml); pass the run.dir of a training run"
        )
    config = load_config(config_path)
    checkpoint = find_checkpoint(run_dir, step)
    if output.exists():
        raise UserError(f"--output {output} already exists; remove it or choose another dir")
    partial = output.with_name(output.name + ".partial")
    with os_errors(partial):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            weights = hf_state(megatron_state(checkpoint, config), config)
            save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
            ids = tokenizer_files(config, run_dir, partial)
            write_json_atomic(partial / "config.json", hf_config(config, ids))
            for name in CODE_FILES:
                shutil.copyfile(HF_CODE / name, partial / name)
            write_json_atomic(
                partial / "lws_export.json",
                {
                    "run_dir": str(run_dir.resolve()),
                    "step": checkpoint_step(checkpoint),
                    "tokenizer": str(config.data.tokenizer),
                },
            )
            partial.rename(output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return output


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lws_megatron.export", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--output", type=Path, required=True, help="the export dir to write")
    args = parser.parse_args(argv)
    out = export(args.run_dir, args.output, args.step)
    print(
        f"exported {args.run_dir} to {out}: load it with transformers' "
        "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

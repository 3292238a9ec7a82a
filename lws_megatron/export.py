"""`python -m lws_megatron.export RUN_DIR [--step N] --output DIR`: a checkpoint as a Hugging Face
model dir that `AutoModelForCausalLM.from_pretrained(DIR)` loads.

An isotropic run whose block is a stock architecture's exports as that architecture
(`Olmo2ForCausalLM`, `Qwen3ForCausalLM`, `LlamaForCausalLM`: `hf/native.py`), which serving
stacks and converters read without remote code; any other run exports as `LWSForCausalLM` with
its modeling code (`lws_megatron/hf/`, loaded with `trust_remote_code=True`). Either way the dir
holds `model.safetensors`, `config.json`, the run's tokenizer as a fast `tokenizer.json`
(`hf/tokenizer.py`) and `lws_export.json` (run, step); it is written as `DIR.partial` and
renamed, so a crash never leaves a half export.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lws_megatron.cli import HelpFormatter
from lws_megatron.config import Config, load_config
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import os_errors, sha256_file, write_json_atomic

HF_CODE = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_lws.py", "modeling_lws.py")
LWS_AUTO_MAP = {
    "AutoConfig": "configuration_lws.LWSConfig",
    "AutoModelForCausalLM": "modeling_lws.LWSForCausalLM",
}


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The run's checkpoint at `step` (default: the newest complete one)."""
    from lws_megatron.training.checkpoint import checkpoint_step

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


def lws_config(config: Config, tokenizer_ids: dict[str, int | None]) -> dict:
    m = config.model
    layers = config.summary().layers
    return {
        "architectures": ["LWSForCausalLM"],
        "model_type": "lws",
        "auto_map": LWS_AUTO_MAP,
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


def run_tokenizer(config: Config, run_dir: Path):
    """The tokenizer the run trained with, refusing a missing or replaced file."""
    from lws_megatron.dataset.tokenizer import load_tokenizer

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
    return load_tokenizer(path)


def _write(partial: Path, config: Config, run_dir: Path, checkpoint: Path) -> str:
    """Everything of the export into `partial`; returns the architecture written."""
    from safetensors.torch import save_file

    from lws_megatron.hf.native import native_architecture, native_config, native_state
    from lws_megatron.hf.tokenizer import write_tokenizer
    from lws_megatron.hf.weights import hf_state, megatron_state
    from lws_megatron.training.checkpoint import checkpoint_step

    tokenizer = run_tokenizer(config, run_dir)
    weights = hf_state(megatron_state(checkpoint), config)
    ids = write_tokenizer(tokenizer, partial, config.model.seq_length)
    arch = native_architecture(config)
    if arch is None:
        hf = lws_config(config, ids)
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE / name, partial / name)
    else:
        hf, weights = native_config(config, ids), native_state(weights, config.model)
    save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(partial / "config.json", hf)
    write_json_atomic(
        partial / "lws_export.json",
        {
            "run_dir": str(run_dir.resolve()),
            "step": checkpoint_step(checkpoint),
            "tokenizer": str(config.data.tokenizer),
            "architecture": hf["architectures"][0],
        },
    )
    return hf["architectures"][0]


def export(run_dir: Path, output: Path, step: int | None = None) -> Path:
    """Write the export of `run_dir`'s checkpoint (default: the newest) to `output`."""
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
            _write(partial, config, run_dir, checkpoint)
            partial.rename(output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return output


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lws_megatron.export",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--output", type=Path, required=True, help="the export dir to write")
    args = parser.parse_args(argv)
    out = export(args.run_dir, args.output, args.step)
    arch = json.loads((out / "lws_export.json").read_text())["architecture"]
    how = "" if arch != "LWSForCausalLM" else ", trust_remote_code=True"
    print(
        f"exported {args.run_dir} to {out} as {arch}: load it with transformers' "
        f"AutoModelForCausalLM.from_pretrained({str(out)!r}{how})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

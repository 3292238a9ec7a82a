"""`python -m lws_megatron.generate (RUN_DIR|EXPORT_DIR) --prompt "..."`: sample a continuation,
for a quick look at what a run learned.

A run dir is exported to a temporary dir first (its newest checkpoint, or --step); an export
dir is loaded as it is. Sampling is transformers' `generate` on the exported model: temperature
0 is greedy, otherwise temperature and top-p sampling from a seeded generator. Nothing is
downloaded (the Hugging Face hub is switched offline).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lws_megatron.errors import UserError, cli_entry
from lws_megatron.export import export

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    """Before transformers or datasets is imported: never reach for the hub."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def export_dir(path: Path, step: int | None = None) -> Iterator[Path]:
    """`path` if it is an export; a temporary export of it if it is a run dir."""
    if (path / "config.json").is_file() and (path / "modeling_lws.py").is_file():
        if step is not None:
            raise UserError(f"{path} is an export (of one step); --step applies to a run dir")
        yield path
    elif (path / "config.yaml").is_file():
        with tempfile.TemporaryDirectory(prefix="lws-export-") as tmp:
            yield export(path, Path(tmp) / "model", step)
    else:
        raise UserError(
            f"{path} is neither a run dir (config.yaml) nor an export dir "
            "(config.json, modeling_lws.py); pass one of them"
        )


def load(model_dir: Path):
    """(model, tokenizer) of an export dir, fp32 on the CPU, in eval mode."""
    go_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return model.eval(), tokenizer


def sample(
    model,
    tokenizer,
    prompt: str,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_tokens: int = 32,
    seed: int = 0,
) -> list[int]:
    """The generated token ids after `prompt` (at most `max_tokens`; fewer at end of text)."""
    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
        raise UserError(
            f"--temperature {temperature} must be >= 0, --top-p {top_p} in (0, 1] "
            f"and --max-tokens {max_tokens} at least 1"
        )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError("--prompt is empty after tokenization; give some text to continue")
    options = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        if temperature > 0
        else {"do_sample": False}
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return out[0, ids.shape[1] :].tolist()


def decode(tokenizer, ids: list[int]) -> str:
    """Text of `ids`; a sentencepiece model decodes itself, so byte pieces become characters."""
    processor = getattr(tokenizer, "sp_model", None)
    if processor is not None:
        return processor.decode(ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lws_megatron.generate", description=__doc__)
    parser.add_argument("path", type=Path, help="a run dir or an export dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="a run dir's checkpoint (default: newest)")
    args = parser.parse_args(argv)
    with export_dir(args.path, args.step) as model_dir:
        model, tokenizer = load(model_dir)
        ids = sample(
            model,
            tokenizer,
            args.prompt,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    print(args.prompt + decode(tokenizer, ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

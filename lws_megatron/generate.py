"""`python -m lws_megatron.generate (RUN_DIR|EXPORT_DIR) --prompt "..."`: sample a continuation,
for a quick look at what a run learned.

A run dir is exported to a temporary dir first (its newest checkpoint, or --step); an export
dir is loaded as it is, by this package's own code (`hf/loading.py`: a folder whose code is not
ours is refused unless --trust-remote-code). Sampling is transformers' `generate` on the exported
model: temperature 0 is greedy, otherwise temperature and top-p sampling from a seeded
generator; the prompt and its continuation are decoded together, as one text. Nothing is
downloaded (the Hugging Face hub is switched offline).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lws_megatron.cli import HelpFormatter
from lws_megatron.errors import UserError, cli_entry


def check_options(temperature: float, top_p: float, max_tokens: int) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature {temperature}: give a number >= 0 (0: greedy)")
    if not 0 < top_p <= 1:  # also refuses nan
        raise UserError(f"--top-p {top_p}: give a number in (0, 1]")
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: give at least 1")


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
    import torch

    check_options(temperature, top_p, max_tokens)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError("--prompt is empty after tokenization; give some text to continue")
    context = model.config.max_position_embeddings
    if ids.shape[1] + max_tokens > context:
        raise UserError(
            f"--max-tokens {max_tokens} after the {ids.shape[1]}-token prompt exceeds the "
            f"model's context of {context} tokens (max_position_embeddings, the run's "
            f"model.seq_length); ask for at most {max(context - ids.shape[1], 0)}"
        )
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


def continuation(tokenizer, prompt: str, ids: list[int]) -> str:
    """The prompt and its continuation as one text: decoding the new ids alone would drop the
    space that starts the first of them (sentencepiece's "▁")."""
    return tokenizer.decode(tokenizer(prompt).input_ids + ids, skip_special_tokens=True)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lws_megatron.generate",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("path", type=Path, help="a run dir or an export dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="a run dir's checkpoint (default: newest)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run an export folder's own modeling code instead of this package's",
    )
    args = parser.parse_args(argv)
    check_options(args.temperature, args.top_p, args.max_tokens)

    from lws_megatron.hf.loading import export_dir, load

    with export_dir(args.path, args.step) as model_dir:
        model, tokenizer = load(model_dir, args.trust_remote_code)
        ids = sample(
            model,
            tokenizer,
            args.prompt,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    print(continuation(tokenizer, args.prompt, ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

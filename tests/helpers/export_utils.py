"""Tiny trained runs and their exports, shared by the export, generate and evaluate tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from training.test_training import train

from lws_megatron.config import load_config
from lws_megatron.export import export, find_checkpoint
from lws_megatron.model import build_model_chunks
from lws_megatron.training import model_state, shards
from lws_megatron.training.distributed import model_parallel
from lws_megatron.training.train_module import model_args

SHORT = ("train.max_steps=3", "eval.interval=0")


def trained_export(
    root: Path, data: dict[str, str], name: str, nproc: int, *overrides: str
) -> tuple[Path, Path]:
    """(run dir, export dir) of a 3-step tiny run under `overrides`."""
    run_dir, _ = train(root, name, nproc, data, *SHORT, *overrides)
    return run_dir, export(run_dir, root / f"{name}-hf")


def megatron_logits(run_dir: str, batches: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Our Megatron model at the run's own TP/PP split, loaded from the run's newest checkpoint
    (each rank reading its own boxes of the global weights): the full logits of each [b, s]
    token batch, on the last stage's TP rank 0 (None on the other ranks)."""
    config = load_config(Path(run_dir) / "config.yaml")
    checkpoint = find_checkpoint(Path(run_dir), None)
    with model_parallel(config) as plan, torch.no_grad():
        [model] = build_model_chunks(
            model_args(config, plan, torch.device("cpu")), seed=0, device="cpu"
        )
        # each weight's box at this rank's TP/PP split, read from the layout-free files
        wanted = [shards.Slice.of(piece.sharded) for piece in model_state.pieces(model)]
        metadata = shards.read_metadata(checkpoint / shards.METADATA)
        shards.read_planned(checkpoint, metadata, shards.plan_reads(metadata, wanted, checkpoint))
        model.eval()
        return [_forward(model, tokens, config.model.d_model) for tokens in batches]


def _forward(model, tokens: torch.Tensor, width: int) -> torch.Tensor | None:
    b, s = tokens.shape
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, width)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, torch.arange(s).expand(b, s), None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1) if ps.get_tensor_model_parallel_rank() == 0 else None


def megatron_reads(checkpoint: str) -> bool:
    """Megatron-Core's own `dist_checkpointing.load` of a checkpoint's weights (no lws-megatron
    reader) gives what ours reads."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from lws_megatron.training.checkpoint import read_full

    ours = read_full(Path(checkpoint))
    wanted = {k: ShardedTensor.from_rank_offsets(k, torch.empty_like(v)) for k, v in ours.items()}
    theirs = dist_checkpointing.load(wanted, checkpoint)
    # Megatron adds what common.pt holds (the optimizer's step count) beside the tensors
    extra = {k: v for k, v in theirs.items() if k not in ours}
    return extra == {"optimizer_step": 3} and all(torch.equal(theirs[k], ours[k]) for k in ours)

"""The planner's activation model against the tensors the built model saves for backward.

A forward of the real Megatron chunk (CPU, fp32, composite kernels) is traced with
`saved_tensors_hooks`; each saved storage is counted once, by the block that saved it first
(weights excluded). The planner's `kept` bytes per layer and for the head must match within 1%
plus one RoPE table (what it leaves out: the norms' per-token rstd, and the rotary table the
first recomputed layer's checkpoint keeps for all), at TP 1 and 2, with and without sequence
parallelism, for each block and recomputation.
"""

from __future__ import annotations

import pytest
import torch

from lws_megatron.config import load_config
from lws_megatron.planner.memory import (
    PRECISIONS,
    Saving,
    head_activations,
    layer_activations,
    recomputed_layers,
)
from lws_megatron.shapes import padded_vocab_size
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed

pytestmark = pytest.mark.distributed


ROPE_TABLE = 32 * 16 * 4  # tiny.yaml: seq_length x d_head, fp32
PAPER_BLOCK = ["model.norm_placement=post", "model.qk_norm=full"]
CASES = {
    "default": [],
    "paper": PAPER_BLOCK,
    "no_qk_norm": ["model.qk_norm=none"],
    "fused_loss": ["model.fused_loss=true"],
    "selective": ["parallel.recompute=selective", "parallel.recompute_layers=[1, 3]"],
    "full": ["parallel.recompute=full", "parallel.recompute_layers=widest:2"],
}


def _saved(model, tokens) -> dict[str, int]:
    """Bytes saved for backward per block: 'embedding', 'layer <i>' (global), 'head'."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    current = ["embedding"]
    found: dict[str, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights | seen:
            seen.add(storage.data_ptr())
            found[current[0]] = found.get(current[0], 0) + storage.nbytes()
        return tensor

    def enter(name):
        return lambda *_: current.__setitem__(0, name)

    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(enter(f"layer {layer.layer_number - 1}"))
    model.decoder.final_layernorm.register_forward_pre_hook(enter("head"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, None, None, labels=tokens)
    return found


def _traced_and_planned(cases: dict[str, list[str]], tp: int) -> dict | None:
    from megatron.core import parallel_state

    from lws_megatron.model import build_model
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import model_args

    out = {}
    for name, overrides in cases.items():
        config = load_config(TINY, [f"parallel.tp={tp}", "train.precision=fp32", *overrides])
        with model_parallel(config) as plan:
            args = model_args(config, plan, torch.device("cpu"))
            model = build_model(args, seed=3, device="cpu")
            shape = (config.train.micro_batch_size, config.model.seq_length)
            traced = _saved(model, torch.randint(0, config.model.vocab_size, shape))
            rank = parallel_state.get_tensor_model_parallel_rank()
        saving = Saving.of(config, PRECISIONS["fp32"], "cpu")
        recomputed = recomputed_layers(config)
        planned = {
            f"layer {i}": layer_activations(
                s, config.model, saving, config.parallel.recompute if i in recomputed else "none"
            ).kept
            for i, s in enumerate(config.summary(tp).layers)
        }
        vocab = padded_vocab_size(config.model, tp)
        head = head_activations(config.model, vocab, saving, config.model.fused_loss)
        planned["head"] = head.kept
        planned["embedding"] = 8 * shape[0] * shape[1]
        out[name] = {"traced": traced, "planned": planned, "sp": saving.sequence_parallel}
    return out if rank == 0 else None


def _compare(found: dict) -> None:
    wrong = []
    for case, result in found.items():
        traced, planned = result["traced"], result["planned"]
        assert traced.keys() == planned.keys(), case
        for block, bytes_ in traced.items():
            if planned[block] != pytest.approx(bytes_, rel=0.01, abs=ROPE_TABLE):
                wrong.append(f"{case}, {block}: planned {planned[block]:.0f}, saved {bytes_}")
    assert not wrong, "\n".join(wrong)


def test_one_rank_keeps_what_the_planner_counts():
    (found,) = run_distributed(_traced_and_planned, 1, CASES, 1, env={"CUDA_VISIBLE_DEVICES": ""})
    _compare(found)
    full = found["full"]["traced"]  # layers 2 and 3 are the widest of tiny.yaml
    assert full["layer 3"] < full["layer 0"] == found["default"]["traced"]["layer 0"]


@pytest.mark.slow
def test_tensor_and_sequence_parallel_ranks_keep_what_the_planner_counts():
    cases = {
        **CASES,
        **{
            f"{k} no_sp": [*v, "parallel.sequence_parallel=false"]
            for k, v in CASES.items()
            if k in ("default", "paper")
        },
    }
    found, _ = run_distributed(_traced_and_planned, 2, cases, 2, env={"CUDA_VISIBLE_DEVICES": ""})
    assert found["default"]["sp"] and not found["default no_sp"]["sp"]
    _compare(found)
    for block in ("layer 0", "head"):  # sequence parallelism splits what the layers keep
        assert found["default"]["traced"][block] < found["default no_sp"]["traced"][block]

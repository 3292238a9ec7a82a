"""TP and PP on gloo against TP=1, PP=1: same weights, loss and gradients (fp32, 1e-5), with
sequence parallelism (on at TP > 1 by default) and without, and with recomputation.

One launch of 4 processes runs every layout in turn (process start-up and the Megatron import
dominate the cost); the tests then compare what the layouts report.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lws_megatron.config import Config, load_config
from tests.helpers.dist_utils import run_distributed

TOLERANCE = 1e-5
MICRO_BATCHES = 4

# Four layers, all different: FFN 64/128/192/256, query heads 4/8/12/16, KV heads 2/4/6/8,
# every count even so that TP=2 applies; vocabulary 250 padded to 256.
TINY_YAML = """
model:
  num_layers: 4
  d_model: 128
  d_head: 8
  vocab_size: 250
  make_vocab_size_divisible_by: 64
  seq_length: 16
  tie_embeddings: false
  rope_theta: 10000.0
lws:
  ffn_knots: [0.5, 2.0]
  attn_knots: [0.25, 1.0]
  gqa: group_size
  kv_group_size: 2
  ffn_multiple: 32
train:
  micro_batch_size: 2
  global_batch_size: 8
  seed: 7
  precision: fp32
"""

# name -> (tp, pp, pipeline_layout)
LAYOUTS = {
    "tp1pp1": (1, 1, ""),
    "tp2": (2, 1, ""),
    "pp2_uneven": (1, 2, "Et|t*3L"),
    "pp4": (1, 4, ""),
    "tp2pp2": (2, 2, "Et*3|tL"),
    "pp2_vpp2": (1, 2, "Et|t|t|tL"),
    "pp2_loss_stage": (1, 2, "Et*4|L"),  # a stage without layers, as the planner may plan
}

# name -> (tp, pp, pipeline_layout, overrides): the same model, kept and recomputed otherwise
VARIANTS = {
    "tp2_no_sp": (2, 1, "", ["parallel.sequence_parallel=false"]),
    "tp2_selective": (2, 1, "", ["parallel.recompute=selective"]),
    "tp2pp2_vpp2_full": (
        2,
        2,
        "Et|t|t|tL",
        ["parallel.recompute=full", "parallel.recompute_layers=widest:2"],
    ),
}


pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _with_parallel(config: Config, tp: int, pp: int, layout: str) -> Config:
    parallel = dataclasses.replace(config.parallel, tp=tp, pp=pp, pipeline_layout=layout)
    return dataclasses.replace(config, parallel=parallel)


def _batches(config: Config) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (config.train.micro_batch_size, config.model.seq_length)
    return [
        {
            "tokens": torch.randint(0, config.model.vocab_size, shape, generator=g),
            "labels": torch.randint(0, config.model.vocab_size, shape, generator=g),
            "loss_mask": (torch.rand(shape, generator=g) > 0.2).float(),
        }
        for _ in range(MICRO_BATCHES)
    ]


def _full(param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
    """The TP=1 tensor from this rank's shard: gather over TP, undo Megatron's strided split."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    group = parallel_state.get_tensor_model_parallel_group()
    dist.all_gather(shards, tensor.contiguous(), group=group)
    stride, dim = param.partition_stride, param.partition_dim
    pieces = [shard.chunk(stride, dim) for shard in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim)


def _train_step(config: Config) -> dict:
    """Build at this layout, run one forward/backward through Megatron's schedule, report."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lws_megatron.training.distributed import model_parallel

    with model_parallel(config) as plan:
        return _train_step_in_groups(config, plan, get_forward_backward_func, parallel_state)


def _train_step_in_groups(config, plan, get_forward_backward_func, parallel_state) -> dict | None:
    from lws_megatron.model import (
        build_model_chunks,
        global_named_parameters,
        sync_model_parallel_grads,
    )
    from lws_megatron.training.forward import forward_step
    from lws_megatron.training.train_module import model_args

    args = model_args(config, plan, torch.device("cpu"))
    chunks = build_model_chunks(args, seed=config.train.seed, device="cpu")
    weights = {name: _full(p, p) for c in chunks for name, p in global_named_parameters(c)}
    batches = _batches(config)
    iterators = [iter(batches) for _ in chunks]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step(args),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=MICRO_BATCHES,
        seq_length=config.model.seq_length,
        micro_batch_size=config.train.micro_batch_size,
        forward_only=False,
    )
    sync_model_parallel_grads(chunks)
    grads = {name: _full(p, p.grad) for c in chunks for name, p in global_named_parameters(c)}
    loss = None
    if reports:
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        loss = float(total[0] / total[1])
    keep = parallel_state.get_tensor_model_parallel_rank() == 0
    keep = keep and parallel_state.get_data_parallel_rank() == 0
    return {"loss": loss, "weights": weights, "grads": grads} if keep else None


def _run_layouts(configs: dict[str, Config]) -> dict[str, dict | None]:
    return {name: _train_step(config) for name, config in configs.items()}


def _merge(per_rank: list[dict | None]) -> dict:
    """One layout's view of the whole model: loss from the last stage, tensors from all stages."""
    merged: dict = {"loss": None, "weights": {}, "grads": {}}
    for report in filter(None, per_rank):
        if report["loss"] is not None:
            merged["loss"] = report["loss"]
        for kind in ("weights", "grads"):
            for name, tensor in report[kind].items():
                if name in merged[kind]:  # a tied embedding seen on the first and last stage
                    torch.testing.assert_close(tensor, merged[kind][name], rtol=0, atol=TOLERANCE)
                merged[kind][name] = tensor
    return merged


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    path = Path(tmp_path_factory.mktemp("tiny")) / "tiny.yaml"
    path.write_text(TINY_YAML)
    configs = {}
    for tied in (False, True):
        base = load_config(path, [f"model.tie_embeddings={str(tied).lower()}"])
        for name, (tp, pp, layout) in LAYOUTS.items():
            configs[f"{name}{'_tied' if tied else ''}"] = _with_parallel(base, tp, pp, layout)
    for name, (tp, pp, layout, overrides) in VARIANTS.items():
        configs[name] = _with_parallel(load_config(path, overrides), tp, pp, layout)
    # The CPU path (gloo, SDPA, the CUDA bridges) also on a machine with a GPU.
    per_rank = run_distributed(_run_layouts, 4, configs, env={"CUDA_VISIBLE_DEVICES": ""})
    return {name: _merge([rank[name] for rank in per_rank]) for name in configs}


def _assert_same(results: dict, name: str, reference: str) -> None:
    got, want = results[name], results[reference]
    assert got["loss"] is not None and abs(got["loss"] - want["loss"]) <= TOLERANCE, (
        f"{name}: loss {got['loss']} vs {want['loss']}"
    )
    for kind in ("weights", "grads"):
        assert got[kind].keys() == want[kind].keys(), f"{name}: {kind} names differ"
        for key, tensor in want[kind].items():
            assert got[kind][key].shape == tensor.shape, f"{name}: {kind} {key} shape"
            diff = (got[kind][key] - tensor).abs().max().item()
            assert diff <= TOLERANCE, f"{name}: {kind} of {key} differ by {diff:.2e}"


def test_reference_model_has_lws_layers(results):
    weights = results["tp1pp1"]["weights"]
    layer = "decoder.layers.{}."
    fc2 = [weights[layer.format(i) + "mlp.linear_fc2.weight"].shape[1] for i in range(4)]
    qkv = [weights[layer.format(i) + "self_attention.linear_qkv.weight"].shape[0] for i in range(4)]
    assert fc2 == [64, 128, 192, 256]
    assert qkv == [8 * (h + 2 * h // 2) for h in (4, 8, 12, 16)]  # d_head * (q + k + v heads)
    assert results["tp1pp1"]["loss"] == pytest.approx(math.log(256), abs=0.5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1pp1"])
def test_layout_matches_tp1_pp1(results, layout, tied):
    suffix = "_tied" if tied else ""
    _assert_same(results, layout + suffix, "tp1pp1" + suffix)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sequence_parallel_and_recompute_variants_match_tp1_pp1(results, variant):
    _assert_same(results, variant, "tp1pp1")

"""Recomputation and sequence parallelism in training: peak memory down, losses unchanged, the
planner's estimate beside the measured peak, and the layout the planner prints is the one that
trains.

Steps run through the runtime's TrainModule on synthetic tokens (`lws_megatron.memory`), on gloo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lws_megatron.config import load_config
from lws_megatron.plan import main as plan_main
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
CROWN = str(ROOT / "configs/demo/crown.yaml")

CPU = {"CUDA_VISIBLE_DEVICES": ""}
STEPS = 8
DEMO_MICRO = ["train.micro_batch_size=8", "train.global_batch_size=16", "train.precision=fp32"]
PAPER_BLOCK = ["model.norm_placement=post", "model.qk_norm=full", "model.init=olmo"]


def _measured(path: str, runs: dict[str, list[str]], steps: int) -> dict:
    from lws_megatron.memory import measure

    return {name: measure(load_config(path, o), name, steps) for name, o in runs.items()}


def _within_estimate(report, tolerance: float = 0.15) -> None:
    for stage in report.stages:
        assert abs(stage.ratio - 1) <= tolerance, (report.config, stage)


def test_recompute_cuts_the_crown_demos_peak_and_keeps_its_losses():
    runs = {
        "none": DEMO_MICRO,
        "widest:3": [*DEMO_MICRO, "parallel.recompute=full", "parallel.recompute_layers=widest:3"],
        "full": [*DEMO_MICRO, "parallel.recompute=full"],
    }
    (found,) = run_distributed(_measured, 1, CROWN, runs, STEPS, env=CPU)
    peak = {name: report.stages[0].measured_bytes for name, report in found.items()}
    assert peak["full"] <= 0.8 * peak["none"]
    assert peak["full"] < peak["widest:3"] < peak["none"]
    for name, report in found.items():
        _within_estimate(report)
        diff = max(abs(a - b) for a, b in zip(report.losses, found["none"].losses))
        assert len(report.losses) == STEPS and diff <= 1e-6, (name, diff)


def test_sequence_parallel_and_selective_recompute_at_tp2_within_the_estimate():
    runs = {
        "plain": [*DEMO_MICRO, "parallel.tp=2", "parallel.sequence_parallel=false"],
        "sp": [*DEMO_MICRO, "parallel.tp=2"],
        "sp_selective": [*DEMO_MICRO, "parallel.tp=2", "parallel.recompute=selective"],
    }
    found, _ = run_distributed(_measured, 2, CROWN, runs, 3, env=CPU)
    peak = {name: report.stages[0].measured_bytes for name, report in found.items()}
    assert peak["sp_selective"] < peak["sp"] < peak["plain"]
    for report in found.values():
        _within_estimate(report)


def test_the_layout_plan_prints_for_recompute_full_is_the_one_that_trains(capsys):
    overrides = ["parallel.recompute=full", "parallel.pipeline_layout=auto", "train.precision=fp32"]
    assert plan_main([CROWN, "--pp", "3", *overrides, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["layout"]
    assert plan_main([CROWN, "--pp", "3", "parallel.pipeline_layout=auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] != planned  # recompute moves it
    runs = {"full": ["parallel.pp=3", "train.micro_batch_size=2", *overrides]}
    (found, *_) = run_distributed(_measured, 3, CROWN, runs, 2, env=CPU)
    assert found["full"].layout == planned
    _within_estimate(found["full"])


def _losses(runs: dict[str, list[str]]) -> dict[str, list[float]] | None:
    """STEPS optimizer steps of each run on the same synthetic batches; losses on rank 0."""
    import torch.distributed as dist

    from lws_megatron.measure.batches import synthetic_batch
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import TrainModule

    out = {}
    for name, overrides in runs.items():
        config = load_config(TINY, overrides)
        with model_parallel(config) as plan:
            module = TrainModule(config, plan, torch.device("cpu"))
            module.compile()
            losses = []
            for step in range(STEPS):
                batches = [
                    synthetic_batch(config, plan.micro_batch_size, seed=100 * step + i)
                    for i in range(plan.micro_batches)
                ]
                losses.append(module.train_batch(batches).loss)
            out[name] = [float(loss) for loss in losses]
    return out if dist.get_rank() == 0 else None


def test_sequence_parallel_and_compiled_recompute_train_like_tp2_without_them():
    """Each block with and without the fused loss: eager with and without sequence
    parallelism, and compiled with it, every one against eager TP=2 without it. And, with
    sequence parallelism, each layer compiled alone under selective recomputation and the
    whole chunk compiled under full recomputation of its widest layers."""
    runs = {}
    for block, block_overrides in (("default", []), ("paper", PAPER_BLOCK)):
        for fused in ("false", "true"):
            for mode, compile, sp in (
                ("off", "none", "false"),
                ("on", "none", "true"),
                ("compiled", "model", "true"),
            ):
                runs[f"{block}/{fused}/{mode}"] = [
                    "parallel.tp=2",
                    f"train.compile={compile}",
                    f"model.fused_loss={fused}",
                    f"parallel.sequence_parallel={sp}",
                    *block_overrides,
                ]
    recomputed = {"layers": "selective", "model": "full"}
    for compile, recompute in recomputed.items():
        runs[f"recompute/{compile}"] = [
            "parallel.tp=2",
            f"train.compile={compile}",
            f"parallel.recompute={recompute}",
            "parallel.recompute_layers=widest:2",
        ]
    found, _ = run_distributed(_losses, 2, runs, env=CPU)
    pairs = [
        (f"{block}/{fused}/{mode}", f"{block}/{fused}/off")
        for block in ("default", "paper")
        for fused in ("false", "true")
        for mode in ("on", "compiled")
    ]
    pairs += [(f"recompute/{compile}", "default/false/off") for compile in recomputed]
    for name, reference in pairs:
        diff = max(abs(a - b) for a, b in zip(found[name], found[reference]))
        assert len(found[name]) == STEPS and diff <= 1e-5, (name, diff)

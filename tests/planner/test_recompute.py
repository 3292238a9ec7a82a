"""Recomputation and sequence parallelism as the config states them and the planner prices them:
which layers, refusals, `plan` reading the config, `--recompute auto`, one precision vocabulary."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.plan import main
from lws_megatron.planner import plan
from lws_megatron.planner.costs import Block, CostModel, cost_model, micro_batches_in_flight
from lws_megatron.planner.memory import recomputed_layers, sequence_parallel, widest_layers
from lws_megatron.planner.partition import tables
from lws_megatron.planner.recompute import chunk_memory, with_recompute
from lws_megatron.planner.stages import plan_recompute

ROOT = Path(__file__).resolve().parents[2]
CROWN = str(ROOT / "configs/demo/crown.yaml")
PAPER_CROWN = str(ROOT / "configs/paper/crown-18l.yaml")
GIB = 2**30


def test_widest_layers_are_the_ones_that_keep_the_most():
    config = load_config(CROWN)  # framed crown: 768-wide FFN at both ends, 640 in the middle
    assert widest_layers(config)[:4] == [0, 9, 4, 5]
    chosen = {
        "all": tuple(range(10)),
        "widest:3": (0, 4, 9),
        "[9, 2]": (2, 9),
    }
    for layers, expected in chosen.items():
        overrides = ["parallel.recompute=full", f"parallel.recompute_layers={layers}"]
        assert recomputed_layers(load_config(CROWN, overrides)) == expected
    assert recomputed_layers(load_config(CROWN, ["parallel.recompute_layers=widest:3"])) == ()


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.recompute_layers=widest", r"recompute_layers='widest': write all, widest:N"),
        ("parallel.recompute_layers=3", r"recompute_layers='3': write all, widest:N"),
        ("parallel.recompute_layers=widest:0", r"widest:0 must name 1 to 10 layers"),
        ("parallel.recompute_layers=widest:11", r"widest:11 must name 1 to 10 layers"),
        ("parallel.recompute_layers=[0, 0]", r"\[0, 0\] must list distinct layer numbers"),
        ("parallel.recompute_layers=[10]", r"\[10\] must list distinct layer numbers from 0 to 9"),
        ("parallel.recompute=some", r"parallel.recompute='some' is not allowed; choose one of"),
        ("parallel.sequence_parallel=often", r"sequence_parallel='often' is not allowed"),
    ],
)
def test_bad_recompute_and_sequence_parallel_settings_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config(CROWN, [override])


def test_sequence_parallel_follows_tp_and_is_refused_where_it_cannot_run():
    def on(*overrides, tp=2):
        return sequence_parallel(load_config(CROWN, list(overrides)), tp)

    assert on() and not on(tp=1) and not on("parallel.sequence_parallel=false")
    assert not on("parallel.sequence_parallel=true", tp=1)  # nothing to split at TP=1
    assert on("zero.stage=2")  # norm gains are summed over TP after the DP reduction
    assert not on("model.seq_length=255")  # nor where the sequence does not split
    with pytest.raises(UserError, match=r"seq_length=255 over parallel.tp=2.*a multiple of 2"):
        on("model.seq_length=255", "parallel.sequence_parallel=true")


def test_chunk_memory_counts_what_the_tables_count():
    rng = random.Random(3)
    for _ in range(40):
        blocks = [
            Block(1, rng.randint(0, 9), rng.randint(0, 9), rng.choice([0, rng.randint(0, 30)]))
            for _ in range(rng.randint(1, 7))
        ]
        model = CostModel(tuple(blocks), Block(0, 2, 1), Block(1, 3, 5, 4), 2.0, "test")
        pp = rng.randint(1, min(3, len(blocks)))
        in_flight = micro_batches_in_flight(pp, 1, 4)
        t = tables(model, pp, in_flight)
        for c in range(pp):
            for i in range(len(blocks) + 1):
                for j in range(i, len(blocks) + 1):
                    expected = chunk_memory(model, blocks[i:j], c == 0, c == pp - 1, in_flight[c])
                    assert t.memory[c, i, j] == pytest.approx(expected), (c, i, j)


def test_plan_prices_the_configs_recompute_and_the_flag_overrides_it(capsys):
    none, full = (
        plan(load_config(PAPER_CROWN, [f"parallel.recompute={kind}"]), pp=4)
        for kind in ("none", "full")
    )
    peak = {p: max(s.memory_bytes for s in p.planned.stages) for p in (none, full)}
    assert peak[full] < peak[none] / 2
    assert main([PAPER_CROWN, "--pp", "4", "parallel.recompute=full", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recompute"] == "full" and report["layout"] == full.planned.layout
    assert main([PAPER_CROWN, "--pp", "4", "parallel.recompute=full", "--recompute", "none"]) == 0
    assert "recompute none," in capsys.readouterr().out
    widest = load_config(
        PAPER_CROWN, ["parallel.recompute=full", "parallel.recompute_layers=widest:3"]
    )
    assert plan(widest, pp=4).recompute == "full on widest:3"


def test_auto_recompute_takes_the_fewest_widest_layers_per_stage(capsys):
    config = load_config(PAPER_CROWN)
    free = plan(config, pp=4)
    limit = 8 * GIB
    assert max(s.memory_bytes for s in free.planned.stages) > limit
    auto = plan_recompute(config, pp=4, device_memory=limit)
    assert 0 < len(auto.recomputed) < config.model.num_layers
    plain, full = (cost_model(with_recompute(config, k), pp=4) for k in ("none", "full"))
    in_flight = micro_batches_in_flight(4, 1, auto.micro_batches)
    for stage in auto.planned.stages:
        order = sorted(stage.layers, key=widest_layers(config).index)
        k = len(stage.recomputed)
        assert set(stage.recomputed) == set(order[:k])  # its widest layers

        def used(count, stage=stage, order=order):
            blocks = [(full if i in order[:count] else plain).layers[i] for i in stage.layers]
            last = stage.rank == 3
            return chunk_memory(plain, blocks, stage.rank == 0, last, in_flight[stage.rank])

        assert used(k) == pytest.approx(stage.memory_bytes, abs=1) and used(k) <= limit
        assert k == 0 or used(k - 1) > limit  # and not one more than it must
    assert main([PAPER_CROWN, "--pp", "4", "--recompute", "auto", "--device-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "parallel.recompute: full" in out
    assert f"parallel.recompute_layers: {list(auto.recomputed)}" in out
    assert f'parallel.pipeline_layout: "{auto.planned.layout}"' in out
    roomy = plan_recompute(config, pp=4, device_memory=80 * GIB)
    assert roomy.recomputed == () and roomy.planned.layout == free.planned.layout


def test_auto_recompute_needs_a_limit_and_one_chunk_per_rank(capsys):
    assert main([PAPER_CROWN, "--pp", "4", "--recompute", "auto"]) == 2
    assert "give --device-memory" in capsys.readouterr().err
    assert (
        main(
            [
                PAPER_CROWN,
                "--pp",
                "2",
                "--vpp",
                "2",
                "--recompute",
                "auto",
                "--device-memory",
                "8GB",
            ]
        )
        == 2
    )
    assert "--vpp 1" in capsys.readouterr().err
    assert main([PAPER_CROWN, "--pp", "4", "--recompute", "auto", "--device-memory", "4GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device memory 4.00 GiB") and "recomputation" not in err


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast", "auto"])
def test_one_precision_vocabulary(capsys, precision):
    assert main([PAPER_CROWN, "--pp", "2", f"train.precision={precision}"]) == 0
    named = "bf16" if precision == "auto" else precision
    assert f", {named}, recompute" in capsys.readouterr().out
    memory = {
        p: np.array(
            [
                s.memory_bytes
                for s in plan(load_config(PAPER_CROWN), pp=2, precision=p).planned.stages
            ]
        )
        for p in ("fp32", "bf16")
    }
    assert (memory["bf16"] < memory["fp32"]).all()


def test_recompute_with_cuda_graphs_is_refused():
    message = r"recompute=full with train.cuda_graphs=true.*recompute=none or train.cuda_graphs"
    with pytest.raises(UserError, match=message):
        load_config(CROWN, ["parallel.recompute=full", "train.cuda_graphs=true"])


def test_memory_tool_refuses_what_it_cannot_measure(capsys):
    from lws_megatron.memory import main as memory_main

    assert memory_main([CROWN, "--steps", "0"]) == 2
    assert "--steps=0: must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert memory_main([CROWN, "train.compile=model"]) == 2
        assert "measure with train.compile=none" in capsys.readouterr().err

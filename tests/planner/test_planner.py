"""The pipeline planner: exact against brute force, memory limits, refusals, paper profiles, CLI."""

import dataclasses
import itertools
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.plan import main
from lws_megatron.planner import PRECISIONS, cost_model, parse_bytes, plan, plan_layout
from lws_megatron.planner.costs import Block, CostModel, micro_batches_in_flight
from lws_megatron.planner.memory import Saving, layer_activations, state_bytes_per_param
from lws_megatron.planner.partition import solve, tables
from lws_megatron.planner.recompute import chunk_memory
from lws_megatron.planner.stages import layout_string
from tests.helpers.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
PAPER = ["baseline-12l", "baseline-18l", "vanilla-18l", "framed-18l", "reverse-18l", "crown-18l"]
DEMO = str(ROOT / "configs/demo/vanilla.yaml")
VANILLA = str(ROOT / "configs/paper/vanilla-18l.yaml")
GIB = 2**30


def brute_force(model: CostModel, pp: int, in_flight: tuple[int, ...], limit):
    """Every split with non-empty middle chunks, scored straight from the blocks."""
    n, chunks = len(model.layers), len(in_flight)
    best = None
    for cuts in itertools.combinations_with_replacement(range(n + 1), chunks - 1):
        score = score_split(model, pp, in_flight, (0, *cuts, n), limit)
        if score is not None and (best is None or score < best):
            best = score
    return best


def score_split(model, pp, in_flight, bounds, limit):
    """(max rank load, sum of squared rank loads), or None if the split is not allowed."""
    chunks = len(bounds) - 1
    if any(bounds[c] == bounds[c + 1] for c in range(1, chunks - 1)):
        return None
    loads, memory = [0] * pp, [0] * pp
    for c in range(chunks):
        layers = list(model.layers[bounds[c] : bounds[c + 1]])
        blocks = layers + [model.embedding] * (c == 0) + [model.output] * (c == chunks - 1)
        loads[c % pp] += sum(b.cost for b in blocks)
        memory[c % pp] += chunk_memory(model, layers, c == 0, c == chunks - 1, in_flight[c])
    if limit is not None and max(memory) > limit:
        return None
    return max(loads), sum(x * x for x in loads)


def random_case(rng: random.Random):
    """Integer costs and sizes, so that every sum is exact in floating point."""
    n = rng.randint(1, 8)
    pp = rng.randint(1, min(4, n))
    vpp = rng.choice([1, 1, 2, 3]) if pp > 1 else 1
    vpp = min(vpp, n // pp)

    def block():
        transient = rng.choice([0, 0, rng.randint(0, 12)])
        return Block(rng.randint(0, 20), rng.randint(0, 10), rng.randint(0, 10), transient)

    model = CostModel(
        layers=tuple(block() for _ in range(n)),
        embedding=block(),
        output=block(),
        bytes_per_param=rng.choice([1, 2]),
        unit="test",
    )
    in_flight = micro_batches_in_flight(pp, vpp, pp * rng.randint(1, 3))
    limit = None if rng.random() < 0.4 else rng.randint(0, 150)
    return model, pp, in_flight, limit


def test_planner_equals_brute_force_on_random_cases():
    rng = random.Random(6)
    kinds = {"free": 0, "limited": 0, "infeasible": 0, "interleaved": 0}
    for _ in range(600):
        model, pp, in_flight, limit = random_case(rng)
        expected = brute_force(model, pp, in_flight, limit)
        solution = solve(tables(model, pp, in_flight), limit)
        if expected is None:
            assert solution is None
            kinds["infeasible"] += 1
            continue
        assert solution.proven
        assert score_split(model, pp, in_flight, solution.bounds, limit) == expected
        kinds["free" if limit is None else "limited"] += 1
        kinds["interleaved"] += len(in_flight) > pp
    assert min(kinds.values()) >= 50, kinds


def test_interleaved_search_past_its_budget_returns_a_valid_split():
    rng = random.Random(1)
    model = CostModel(
        tuple(Block(rng.uniform(1, 4), 1, 1) for _ in range(40)),
        Block(0, 1, 1),
        Block(6, 1, 1),
        1.0,
        "test",
    )
    in_flight = micro_batches_in_flight(4, 3, 8)
    solution = solve(tables(model, 4, in_flight), None, budget=50)
    assert not solution.proven
    assert score_split(model, 4, in_flight, solution.bounds, None) is not None


def test_memory_limit_respected_and_binding():
    config = load_config(VANILLA)
    free = plan(config, pp=4)
    limit = 9 * GIB
    assert max(s.memory_bytes for s in free.planned.stages) > limit
    limited = plan(config, pp=4, device_memory=limit)
    assert all(s.memory_bytes <= limit for s in limited.planned.stages)
    assert limited.planned.imbalance >= free.planned.imbalance
    assert limited.planned.layout != free.planned.layout


def test_infeasible_memory_names_stage_and_overage():
    message = r"needs 6\.75 GiB on stage 0 \(1\.75 GiB over\).*at least 7GiB"
    with pytest.raises(UserError, match=message):
        plan(load_config(VANILLA), pp=4, device_memory=5 * GIB)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pp": 19}, r"PP=19 is more than the model's 18 layers.*PP <= 18"),
        ({"pp": 4, "vpp": 5}, r"VPP=5 does not divide the 18 layers.*VPP <= 4"),
        ({"pp": 1, "vpp": 2}, r"VPP=2 needs PP >= 2"),
        ({"pp": 4, "vpp": 2, "dp": 8}, r"3 micro batches.*multiple of PP=4"),
        ({"pp": 2, "dp": 5}, r"global_batch_size=384 is not a multiple"),
        ({"pp": 0}, r"PP=0: must be at least 1"),
    ],
)
def test_bad_sizes_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        plan(load_config(VANILLA), **kwargs)


def test_zero_2_plans_with_a_pipeline_like_zero_1():
    """ZeRO 2 keeps gradients whole in DDP's buckets, so its stages and bytes are ZeRO 1's."""
    one, two = (plan(load_config(VANILLA, [f"zero.stage={z}"]), pp=2) for z in (1, 2))
    assert two.planned.layout == one.planned.layout
    assert [s.memory_bytes for s in two.planned.stages] == [
        s.memory_bytes for s in one.planned.stages
    ]


# Whole layers set a floor: e.g. baseline-12l at PP=3 puts 232 MFLOP/token of head on one
# stage and 12 equal layers of 56.6 on the rest; no split beats 6 layers on one stage (1.118).
LAYER_GRANULARITY = {("baseline-12l", 3), ("vanilla-18l", 3), ("vanilla-18l", 4)}


@pytest.mark.parametrize("name", PAPER)
def test_paper_profiles_planned_optimal_and_balanced(name):
    config = load_config(ROOT / f"configs/paper/{name}.yaml")
    for pp in (2, 3, 4):
        result = plan(config, pp=pp)
        model = cost_model(config, pp=pp)
        in_flight = micro_batches_in_flight(pp, 1, result.micro_batches)
        best, _ = brute_force(model, pp, in_flight, None)
        assert max(s.cost for s in result.planned.stages) == pytest.approx(best, rel=1e-12)
        assert result.planned.imbalance <= result.even.imbalance
        assert (result.planned.imbalance <= 1.08) != ((name, pp) in LAYER_GRANULARITY)


def test_layout_matches_megatron_virtual_stage_order():
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    result = plan(load_config(VANILLA), pp=3, vpp=2)
    parsed = PipelineParallelLayerLayout(result.planned.layout, 3)
    for stage in result.planned.stages:
        for v, chunk in enumerate(stage.chunks):
            assert parsed.layout[stage.rank][v].count(LayerType.decoder) == len(chunk)
    assert parsed.layout[0][0][0] == LayerType.embedding
    assert parsed.layout[2][1][-1] == LayerType.loss
    assert layout_string((0, 0, 3, 5, 5)) == "E|t*3|t*2|L"
    assert layout_string((0, 1, 2)) == "Et|tL"


def test_plan_layout_for_training():
    config = load_config(DEMO, ["parallel.pp=2"])
    assert plan_layout(config) == "Et*7|t*3L"
    assert plan_layout(config, pp=1) == "Et*10L"


def test_micro_batches_in_flight():
    assert micro_batches_in_flight(4, 1, 24) == (4, 3, 2, 1)
    assert micro_batches_in_flight(4, 1, 2) == (2, 2, 2, 1)
    # Megatron's interleaved order, PP=2, VPP=2, 4 micro batches, replayed by hand: rank 0
    # holds all 4 of chunk 0 and 2 of chunk 2; rank 1 peaks at 3 of chunk 1 and 1 of chunk 3.
    assert micro_batches_in_flight(2, 2, 4) == (4, 3, 2, 1)


def test_memory_accounting():
    autocast, bf16, fp32 = (PRECISIONS[k] for k in ("bf16-autocast", "bf16", "fp32"))
    # fp32 weights, gradients, Adam moments; ZeRO's own fp32 weight copy; autocast's bf16 copy
    assert state_bytes_per_param(autocast, zero=0, dp=4) == 4 + 4 + 8 + 2
    assert state_bytes_per_param(autocast, zero=1, dp=4) == 4 + 4 + 12 / 4 + 2
    assert state_bytes_per_param(autocast, zero=2, dp=4) == 4 + 4 + 12 / 4 + 2  # whole grads
    assert state_bytes_per_param(fp32, zero=0, dp=1) == 16
    # bf16 weights and gradients, fp32 masters and moments: ours without ZeRO, DeepSpeed's with
    assert state_bytes_per_param(bf16, zero=0, dp=4) == 2 + 2 + 4 + 8
    assert state_bytes_per_param(bf16, zero=1, dp=4) == 2 + 2 + 12 / 4
    config = load_config(VANILLA)  # the paper's block: QK-norm over the whole projection
    shape, dims = config.summary().layers[-1], config.model  # 3072 FFN, 12 q / 4 kv heads
    d, q, k, f = 768, 12 * 64, 4 * 64, 3072
    rope = 4 * 1024 * 64 * 2  # cos and sin for the query and the key
    whole = layer_activations(shape, dims, Saving(bf16))
    # norm inputs, QKV/FC1 inputs; QKV output, RoPE'd q and k, attention output, the QK-norm's
    # query copy and normalised q and k; log-sum-exp; SwiGLU's input and output (fused)
    per_token = 2 * 2 * d + 2 * 2 * d + 2 * (5 * q + 4 * k) + 4 * 12 + 2 * 3 * f
    assert whole.kept == 1024 * per_token + rope
    assert whole.rebuilt == 1024 * 2 * (2 * f + 2 * d)  # backward's working gradients
    full = layer_activations(shape, dims, Saving(bf16), "full")
    assert full.kept == 1024 * 2 * d and full.rebuilt == whole.kept - full.kept + whole.rebuilt
    selective = layer_activations(shape, dims, Saving(bf16), "selective")
    assert selective.kept == whole.kept - 1024 * 2 * 3 * f
    split = layer_activations(shape, dims, Saving(bf16, tp=2, sequence_parallel=True))
    assert split.kept == (whole.kept - rope) / 2 + rope  # all but RoPE's tables split over TP
    composite = layer_activations(shape, dims, Saving(fp32, fused_kernels=False))
    per_token = 2 * 8 * d + 2 * 4 * d + 4 * (5 * q + 4 * k) + 4 * 12 + 4 * 5 * f
    assert composite.kept == 1024 * per_token + 2 * rope
    tied = cost_model(load_config(DEMO, ["model.tie_embeddings=true"]), pp=2)
    assert tied.output.params == tied.embedding.params + 192  # the head's copy and final norm


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5TB") == 1.5e12
    with pytest.raises(UserError, match="80XB"):
        parse_bytes("80XB")


def test_cli_json_contract(capsys):
    assert main([DEMO, "--pp", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "Et*7|t*3L"
    assert isinstance(report["imbalance"], float) and report["imbalance"] < 1.02
    assert isinstance(report["even_split_imbalance"], float)
    assert report["even_split_imbalance"] > 1.3
    assert [s["layers"] for s in report["stages"]] == [list(range(7)), [7, 8, 9]]
    for stage in report["stages"]:
        assert isinstance(stage["cost"], float) and isinstance(stage["memory_bytes"], int)
    assert report["even_split"]["megatron_default"] is True


def test_cli_text(capsys):
    assert main([VANILLA, "--pp", "3", "--vpp", "2", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^0\s+E 0-1,9-14\s+8", out, re.M)
    assert 'parallel.pipeline_layout: "Et*2|t*5|t*2|t*6|t*3|L"' in out
    assert main([VANILLA, "--pp", "4"]) == 0
    assert "do not divide into 4 equal stages" in capsys.readouterr().out


def test_cli_errors_one_line_status_2(capsys):
    assert main([VANILLA, "--pp", "4", "--device-memory", "5GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device memory 5.00 GiB") and err.count("\n") == 1
    done = subprocess.run(
        [sys.executable, "-m", "lws_megatron.plan", VANILLA, "--pp", "40"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: PP=40 is more than the model's 18 layers; choose PP <= 18"
    ]


def test_the_planner_imports_no_torch_and_no_training_runtime():
    """The cost model, the partition and the CLI are pure: torch, Megatron and the runtime's
    process groups (lws_megatron.calibration) load only when a plan is measured."""
    probe = (
        "import sys, lws_megatron.plan, lws_megatron.planner\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron',"
        " 'deepspeed') or m.startswith(('lws_megatron.calibration', 'lws_megatron.training'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


def _calibrate(cache: str) -> dict:
    """In one gloo process: calibrate twice (the second from the cache), on another kernel,
    and time two splits directly."""
    from lws_megatron import calibration

    tiny = load_config(
        DEMO,
        [
            "model.d_model=64",
            "model.d_head=16",
            "model.num_layers=4",
            "model.seq_length=32",
            "model.vocab_size=512",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
        ],
    )
    timings = calibration.layer_timings(tiny, repeats=1, cache=Path(cache))
    measured_again = []
    original = calibration.fastest_times
    calibration.fastest_times = lambda *a: measured_again.append(1) or original(*a)
    again = calibration.layer_timings(tiny, repeats=1, cache=Path(cache))
    calibration.fastest_times = original
    math_kernel = dataclasses.replace(
        tiny, model=dataclasses.replace(tiny.model, sdpa_kernel="math")
    )
    calibration.layer_timings(math_kernel, repeats=1, cache=Path(cache))
    measured = plan(tiny, pp=2, timings=timings)
    seconds = calibration.time_splits(
        tiny, [measured.planned.bounds, measured.even.bounds], 2, repeats=1
    )
    return {
        "timings": timings,
        "again": again,
        "re_measured": bool(measured_again),
        "shapes": set(tiny.summary().layers),
        "unit": measured.unit,
        "seconds": seconds,
        "device": calibration.device_label(),
    }


@pytest.mark.distributed
def test_profile_calibration_cached(tmp_path):
    cache = tmp_path / "times.json"
    (out,) = run_distributed(_calibrate, 1, str(cache))
    timings = out["timings"]
    assert set(timings.layers) == out["shapes"]
    assert all(t > 0 for t in [*timings.layers.values(), timings.embedding, timings.output])
    assert all(key.startswith(out["device"]) for key in json.loads(cache.read_text()))
    assert out["again"] == timings and not out["re_measured"]
    # another attention kernel is another measurement, not the cached one
    keys = json.loads(cache.read_text())
    blocks = len(timings.layers) + 2  # every layer shape, the embedding, the head
    assert sum("|sdpa=math|" in k for k in keys) == sum("|sdpa=auto|" in k for k in keys) == blocks
    assert out["unit"] == "s/micro-batch"
    seconds = out["seconds"]
    assert len(seconds) == 2 and all(len(s) == 2 and min(s) > 0 for s in seconds)

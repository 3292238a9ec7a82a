"""The training runtime end to end: real torchrun launches on gloo, compared step by step."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lws_megatron.config import load_config
from tests.helpers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]

BF16 = "train.precision=bf16"


def command(nproc: int, run_dir: Path, data: dict[str, str], *overrides: str) -> list[str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    return [
        *launcher,
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(TINY),
        f"run.dir={run_dir}",
        f"data.path=[{data['prefix']}]",
        f"data.tokenizer={data['tokenizer']}",
        *overrides,
    ]


def train(tmp_path: Path, name: str, nproc: int, data, *overrides: str, check: bool = True):
    run_dir = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command(nproc, run_dir, data, *overrides),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return run_dir, proc


def records(run_dir: Path, key: str = "loss") -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def losses(run_dir: Path) -> np.ndarray:
    by_step = records(run_dir)
    return np.array([by_step[s] for s in sorted(by_step)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """TP=1, PP=1, DP=1, micro 2 x accumulation 4: the run every layout must reproduce."""
    run_dir, _ = train(tmp_path_factory.mktemp("ref"), "ref", 1, tiny_data)
    return run_dir


def test_reference_run_writes_its_run_directory(reference):
    loss = losses(reference)
    assert len(loss) == 10 and loss[-1] < loss[0] - 0.3
    val = records(reference, "val_loss")
    assert sorted(val) == [0, 5, 10] and all(np.isfinite(list(val.values())))
    info = json.loads((reference / "run_info.json").read_text())
    assert info["total_params"] == load_config(TINY).summary().total_params
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["final_loss"] == pytest.approx(loss[-1])
    assert load_config(reference / "config.yaml").train.max_steps == 10
    for line in (reference / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        keys = (
            {"val_loss", "val_ppl"}
            if "val_loss" in record
            else {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
        )
        assert keys <= record.keys() and "step" in record
    assert list((reference / "tensorboard").glob("events.*"))
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_00000010"


def test_micro_batch_2_x_4_matches_4_x_2(tmp_path, tiny_data, reference):
    run_dir, _ = train(tmp_path, "mb4", 1, tiny_data, "train.micro_batch_size=4")
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=0, atol=1e-5)


def test_batches_built_in_the_training_process_give_the_same_losses(tmp_path, tiny_data, reference):
    """The reference builds its batches in two loader workers (the default)."""
    run_dir, _ = train(tmp_path, "workers0", 1, tiny_data, "data.num_workers=0")
    np.testing.assert_array_equal(losses(run_dir), losses(reference))


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory, tiny_data):
    """The reference run with train.precision=bf16 (bf16 modules, our fp32 masters)."""
    run_dir, _ = train(tmp_path_factory.mktemp("bf16"), "bf16", 1, tiny_data, BF16)
    return run_dir


@pytest.mark.parametrize("zero", [0, 1])
def test_bf16_weights_train_like_fp32(tmp_path, tiny_data, reference, bf16_reference, zero):
    """train.precision=bf16 on CPU: bf16 modules, fp32 masters (ours at ZeRO 0, DeepSpeed's at
    ZeRO 1); the loss follows the fp32 run within bf16's rounding."""
    run_dir = bf16_reference
    if zero:
        run_dir, _ = train(tmp_path, "bf16", 1, tiny_data, BF16, f"zero.stage={zero}")
    assert json.loads((run_dir / "run_info.json").read_text())["precision"] == "bf16"
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=0, atol=0.02)


@pytest.mark.parametrize(
    "layout",
    [["parallel.tp=2"], ["parallel.pp=2", "parallel.pipeline_layout=Et*1|t*3L"]],
    ids=["tp2", "pp2-uneven"],
)
@pytest.mark.parametrize("compile", ["none", "model"])
def test_model_parallel_layouts_match_the_reference(
    tmp_path, tiny_data, reference, layout, compile
):
    run_dir, _ = train(tmp_path, "mp", 2, tiny_data, f"train.compile={compile}", *layout)
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=0, atol=1e-4)
    val, ref_val = records(run_dir, "val_loss"), records(reference, "val_loss")
    np.testing.assert_allclose(list(val.values()), list(ref_val.values()), atol=1e-4)
    if compile != "none":
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["graph_breaks"] == 0 and summary["compiled_graphs"] >= 2


def test_zero_2_with_tp_and_a_shared_qk_norm_gain_matches_the_reference(
    tmp_path, tiny_data, reference
):
    """The gain's gradient is summed over TP on the reduced gradients, before DeepSpeed's
    stage-2 optimizer takes them."""
    run_dir, _ = train(tmp_path, "z2tp", 2, tiny_data, "parallel.tp=2", "zero.stage=2")
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=0, atol=1e-4)


def test_data_parallel_zero_stages_agree(tmp_path, tiny_data, reference):
    runs = {
        stage: losses(train(tmp_path, f"zero{stage}", 2, tiny_data, f"zero.stage={stage}")[0])
        for stage in (0, 1, 2)
    }
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(runs[2], runs[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(runs[0], losses(reference), rtol=0, atol=1e-4)


@pytest.mark.parametrize("precision, nproc", [("fp32", 1), ("bf16", 1), ("fp32", 2)])
def test_killed_run_resumes_to_the_same_losses(
    tmp_path, tiny_data, reference, bf16_reference, precision, nproc
):
    """bf16: the fp32 master weights come back from the checkpoint, not their rounding. Two
    processes: DP=2 at ZeRO 1, each rank's shard of the optimizer state comes back, and the
    run continues its own uninterrupted losses."""
    run_dir = tmp_path / "killed"
    extra = ("checkpoint.interval=4", f"train.precision={precision}")
    if precision == "bf16":
        reference = bf16_reference
    if nproc == 2:
        extra = (*extra, "zero.stage=1")
        reference, _ = train(tmp_path, "whole", 2, tiny_data, *extra)
    proc = subprocess.Popen(
        command(nproc, run_dir, tiny_data, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout:
        if "step_00000004" in line and "saved checkpoint" in line:
            # torchrun's workers run in sessions of their own: each is killed, then torchrun.
            subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert max(records(run_dir)) < 10
    _, resumed = train(tmp_path, "killed", nproc, tiny_data, *extra)
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    assert losses(run_dir).tolist() == losses(reference).tolist()  # exact, bit for bit


def test_sigterm_checkpoints_at_the_next_step_not_the_next_read_and_exits_cleanly(
    tmp_path, tiny_data
):
    """Steps are read every 20 (a checkpoint) or 1000 (a log line); the stop comes anyway one
    step after the signal."""
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(
        command(
            1,
            run_dir,
            tiny_data,
            "train.max_steps=100000",
            "train.log_interval=1000",
            "checkpoint.interval=20",
            "eval.interval=0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout:
        if line.startswith("saved checkpoint") and "step_00000020" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.split("_")[1])
    by = int(
        re.search(r"pre-emption signal \(SIGTERM to rank 0 by step (\d+)\): checkpointed", out)[1]
    )
    assert 20 <= by and stopped == by + 1, out  # the next read would have been step 40
    assert f"by step {by}): checkpointed at step {stopped}, exiting" in out
    assert (run_dir / "checkpoints" / latest / "meta.json").is_file()
    assert not (run_dir / "summary.json").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, "layout", 1, tiny_data, "train.max_steps=2")
    _, proc = train(
        tmp_path, "layout", 1, tiny_data, "train.max_steps=4", "model.num_layers=3", check=False
    )
    assert proc.returncode == 2
    assert "was written by a different model or data (model.layers:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mismatched_tokenizer_is_refused_before_training(tmp_path, tiny_data):
    from data_prep import tokenizer

    other = tmp_path / "unigram"  # same corpus and vocabulary size, another model
    corpus = Path(tiny_data["prefix"]).parent / "corpus" / "pydocs.jsonl"
    assert (
        tokenizer.main(
            [
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "512",
                "--model-type",
                "unigram",
                "--output",
                str(other),
            ]
        )
        == 0
    )
    run_dir, proc = train(
        tmp_path, "tok", 1, tiny_data, f"data.tokenizer={other}.model", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"not with {other}.model" in proc.stderr and tiny_data["tokenizer"] in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_data_corrupted_like_the_papers_is_refused(tmp_path, tiny_data):
    """int32 tokens written to a file the index says is uint16: every other token is zero."""
    import shutil

    prefix = tmp_path / "bad"
    for suffix in (".manifest.json", "_valid.bin", "_valid.idx", "_train.idx"):
        shutil.copy(tiny_data["prefix"] + suffix, str(prefix) + suffix)
    tokens = np.fromfile(tiny_data["prefix"] + "_train.bin", dtype=np.uint16)
    tokens.astype(np.int32).view(np.uint16)[: tokens.size].tofile(str(prefix) + "_train.bin")
    run_dir, proc = train(tmp_path, "bad", 1, tiny_data, f"data.path=[{prefix}]", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad_train" in proc.stderr and not (run_dir / "metrics.jsonl").exists()


def test_bad_parallel_settings_fail_before_compute(tmp_path, tiny_data):
    _, proc = train(tmp_path, "gbs", 2, tiny_data, "train.global_batch_size=6", check=False)
    assert proc.returncode != 0
    assert "train.global_batch_size=6 is not a multiple" in proc.stderr
    _, proc = train(tmp_path, "pp3", 1, tiny_data, "parallel.pp=3", check=False)
    assert "1 processes can't hold parallel.tp=1 x parallel.pp=3" in proc.stderr


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_data):
    """A learning rate of 1e20 blows the weights up after one step; every later loss is inf."""
    run_dir, proc = train(
        tmp_path,
        "nan",
        1,
        tiny_data,
        "optim.lr=1e20",
        "optim.clip_grad=0",
        "train.max_nonfinite_steps=3",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "3 steps in a row had a non-finite loss or gradient (by step 4)" in proc.stderr
    skipped = records(run_dir, "skipped_steps")
    assert [skipped[s] for s in sorted(skipped)] == [0, 1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"

"""A real run's logs as users read them: step lines with the total and an ETA, TensorBoard tags
grouped with the config as hyperparameters, and a wandb run (offline, no network) holding
exactly the metrics of metrics.jsonl, under their names, with the resolved config."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from training.test_training import train

from lws_megatron.config import load_config

pytest.importorskip("wandb")

pytestmark = [pytest.mark.slow]


def wandb_records(path: Path) -> list:
    """The protobuf records of a wandb transaction log: wandb's 7-byte header, then LevelDB's
    log format (32 KiB blocks of [crc32c, length, type] chunks; full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, at = [], b"", 7
    while at + 7 <= len(data):
        room = 32768 - at % 32768
        if room < 7:
            at += room
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            at += room
            continue
        chunk, at = data[at + 7 : at + 7 + length], at + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_data):
    os.environ["WANDB_MODE"] = "offline"  # read by the training subprocess
    try:
        return train(
            tmp_path_factory.mktemp("logging"),
            "logged",
            1,
            tiny_data,
            "train.max_steps=6",
            "train.log_interval=2",
            "eval.interval=3",
            "train.callbacks=[wandb]",
            "run.name=logged",
        )
    finally:
        del os.environ["WANDB_MODE"]


def test_step_lines_show_the_total_and_an_eta(logged):
    _, proc = logged
    steps = [line for line in proc.stdout.splitlines() if "| loss" in line]
    assert [line.split("|")[0].split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
    assert all(" | ETA " in line for line in steps)
    assert any(
        line.startswith("step      3/6 | validation loss") for line in proc.stdout.splitlines()
    )


def test_wandb_run_holds_the_metrics_of_metrics_jsonl(logged):
    run_dir, _ = logged
    wanted = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [log] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            values = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history.setdefault(values.pop("_step"), {}).update(values)
    by_step: dict[int, dict] = {}  # one wandb row per step: a later record's values win
    for record in wanted:
        by_step.setdefault(record["step"], {}).update(record)
    assert sorted(history) == sorted(by_step) == [0, 2, 3, 4, 6]
    for step, record in by_step.items():
        for key, value in record.items():
            if key != "step":
                assert history[step][key] == pytest.approx(value), (step, key)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    config.pop("_wandb", None)
    assert config == load_config(run_dir / "config.yaml").to_dict()
    assert config["train"]["max_steps"] == 6 and config["run"]["name"] == "logged"
    assert (
        run.run_id == (run_dir / "wandb_id").read_text().strip() and run.project == "lws-megatron"
    )


def test_tensorboard_tags_are_grouped_with_the_config_as_hyperparameters(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = logged
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "val/loss",
        "val/ppl",
        "perf/mfu",
        "perf/tokens_per_s",
    } <= tags
    assert all(t.split("/")[0] in ("train", "val", "perf") for t in tags)
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    start = plugins["_hparams_/session_start_info"]
    assert b"train.max_steps" in start and b"model.d_model" in start

"""What a run prints and logs, without training: step lines count to the total with an ETA,
TensorBoard tags are grouped, the config becomes flat hyperparameters, and the CPU peak MFU is
measured against is measured once per machine and named."""

from __future__ import annotations

import json

import pytest

from lws_megatron.cli import duration
from lws_megatron.training import metrics, peak_flops
from lws_megatron.training.metrics import MetricsWriter, flat_hparams, tensorboard_tag

RECORD = {
    "step": 12,
    "tokens": 1536,
    "loss": 5.25,
    "lr": 1e-3,
    "grad_norm": 0.5,
    "tokens_per_s": 1000.0,
    "tokens_per_s_per_device": 500.0,
    "mfu": 0.1,
    "step_time_s": 0.5,
    "mem_gb": 1.0,
    "skipped_steps": 0,
    "load_avg": 1.5,
}


def test_step_lines_count_to_the_total_with_an_eta(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 100.0, 100.0, 130.0, 130.0])
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, max_steps=72)
    writer.log(RECORD)  # first interval: its own step time, 0.5 s x 60 steps left
    writer.log({**RECORD, "step": 24})  # then the wall clock: 30 s per 12 steps, 48 left
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("step     12/72 | loss 5.2500") and first.endswith("| ETA 30s")
    assert second.startswith("step     24/72 |") and second.endswith("| ETA 2m 00s")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [12, 24]


def test_tensorboard_tags_are_grouped():
    assert [tensorboard_tag(k) for k in ("loss", "lr", "val_loss", "val_ppl", "mfu", "tokens")] == [
        "train/loss",
        "train/lr",
        "val/loss",
        "val/ppl",
        "perf/mfu",
        "train/tokens",
    ]
    assert {tensorboard_tag(k) for k in metrics.PERF_KEYS} == {
        f"perf/{k}" for k in metrics.PERF_KEYS
    }


def test_config_becomes_flat_hyperparameters():
    tree = {
        "model": {"d_model": 64, "tie": False},
        "lws": {"knots": [1.0, 4.0]},
        "run": {"name": ""},
    }
    assert flat_hparams(tree) == {
        "model.d_model": 64,
        "model.tie": False,
        "lws.knots": "[1.0, 4.0]",
        "run.name": "",
    }


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m 05s", "2h 07m"]


def test_cpu_peak_is_measured_once_per_machine_and_named(tmp_path, monkeypatch):
    monkeypatch.delenv(peak_flops.ENV, raising=False)
    monkeypatch.setattr(peak_flops, "measure_matmul_flops", lambda: 42.5e9)
    flops, source = peak_flops.cpu_peak_flops(tmp_path)
    assert flops == 42.5e9 and "CPU peak 42.5 GFLOP/s" in source and "measured once" in source

    def never():
        raise AssertionError("measured again")

    monkeypatch.setattr(peak_flops, "measure_matmul_flops", never)
    assert peak_flops.cpu_peak_flops(tmp_path) == (flops, source)
    (tmp_path / "peak_flops.json").write_text('{"x": "not a measurement"}')
    monkeypatch.setattr(peak_flops, "measure_matmul_flops", lambda: 40e9)
    assert peak_flops.cpu_peak_flops(tmp_path)[0] == 40e9  # a damaged cache is measured anew


def test_a_known_peak_can_be_given(monkeypatch):
    import torch

    monkeypatch.setenv(peak_flops.ENV, "1.5e11")
    assert peak_flops.device_peak_flops(torch.device("cpu")) == (1.5e11, "LWS_PEAK_FLOPS=1.5e11")


@pytest.mark.parametrize(
    "name,peak", [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12)]
)
def test_gpu_peaks_come_from_the_data_sheet(name, peak):
    found = next(p for fragment, p in peak_flops.GPU_PEAKS.items() if fragment in name)
    assert found == peak


def test_the_summary_takes_the_validation_loss_of_the_last_step(tmp_path):
    """An evaluation logged before a resume is not the run's final one."""
    from lws_megatron.training.trainer import run_summary

    path = tmp_path / "metrics.jsonl"
    train = {"loss": 2.5, "tokens_per_s": 100.0, "mfu": 0.1}
    lines = [{"step": 5, "val_loss": 3.0}, {"step": 10, **train}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_summary(path, 10, 4, 1.0)["final_val_loss"] is None
    with path.open("a") as f:
        f.write(json.dumps({"step": 10, "val_loss": 2.0}) + "\n")
    summary = run_summary(path, 10, 4, 1.0)
    assert summary["final_val_loss"] == 2.0 and summary["final_val_ppl"] == pytest.approx(
        7.389, 1e-3
    )
    assert summary["final_loss"] == 2.5 and summary["tokens"] == 40

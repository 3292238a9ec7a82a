"""Run metrics: a console line per interval, `metrics.jsonl`, TensorBoard; MFU from the shape
engine."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lws_megatron.training.run_dir import trim_metrics

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """The device's peak FLOP/s for MFU, and how it was found.

    GPUs come from the table above. A CPU has no data-sheet figure that means anything for
    PyTorch, so its peak is measured: the best fp32 matrix multiply over all its threads.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in _GPU_PEAKS.items():
            if fragment in name:
                return peak, f"{name} data sheet (bf16 dense)"
        return 0.0, f"{name}: unknown peak, MFU not reported"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"CPU, measured fp32 matmul over {torch.get_num_threads()} threads"


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """Written by global rank 0 only; every line is flushed so a killed run keeps its history."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool = True, purge_after: int = 0
    ):
        """`purge_after`: the step a run resumed at; records of later steps (logged by the run
        before it stopped) are dropped, since this run logs them again."""
        self.enabled = enabled
        self.start = time.time()
        self._file = None
        self._tb = None
        if enabled:
            trim_metrics(run_dir, purge_after)
            self._file = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(run_dir / "tensorboard"),
                    purge_step=purge_after + 1 if purge_after else None,
                )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time_s": round(time.time() - self.start, 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time_s") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()
        print(_console_line(record), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _console_line(r: dict[str, Any]) -> str:
    if "val_loss" in r:
        return f"step {r['step']:>6} | validation loss {r['val_loss']:.4f} | ppl {r['val_ppl']:.2f}"
    return (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad norm "
        f"{r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s "
        f"({r['tokens_per_s_per_device']:,.0f} per device) | MFU {100 * r['mfu']:.1f}% | "
        f"{r['step_time_s'] * 1000:.0f} ms/step | mem {r['mem_gb']:.2f} GB"
        + (f" | skipped {r['skipped_steps']}" if r.get("skipped_steps") else "")
    )

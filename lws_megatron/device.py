"""The device a rank computes on: which one, waiting for it, its name, its autocast context.

The one place that knows CPU from CUDA, so model building, training, benchmarks and the
planner's calibration agree on the device and on how mixed precision is applied.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch


def default_device() -> torch.device:
    """This rank's CUDA device if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs eagerly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The forward pass's mixed-precision context for a compute dtype (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def device_name(device: torch.device) -> str:
    """The GPU model, or the CPU model and torch's thread count: what timings depend on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        model = names[0] if names else model
    return f"cpu {model} x{torch.get_num_threads()} threads"

"""The device a rank computes on: which one, waiting for it, its name, its autocast context.

The one place that knows CPU from CUDA, so model building, training, benchmarks and the
planner's calibration agree on the device and on how mixed precision is applied.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode


def default_device() -> torch.device:
    """This rank's CUDA device if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs eagerly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_values(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 device tensor, without waiting for the device: from pageable
    memory a copy to CUDA blocks the host; from pinned memory it is queued like a kernel."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class SyncCounter:
    """How many times the host waited for the device while counting (see `count_syncs`)."""

    count = 0


# What makes a host read a tensor's values: on CUDA each is a device synchronisation.
_READS = frozenset(
    getattr(torch.Tensor, name)
    for name in (
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__array__",
    )
)


def _not_token_ids(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point or tensor.dtype == torch.bool


_ON_HOST = [0]


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Tensors that never leave the host (a gloo group's object gather of host numbers): on
    CUDA they wait for no device, so a CPU's read counter leaves them out too."""
    _ON_HOST[0] += 1
    try:
        yield
    finally:
        _ON_HOST[0] -= 1


class _CountReads(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS and not _ON_HOST[0] and _not_token_ids(args[0]):
            self.counter.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[SyncCounter]:
    """Count the host's waits for the device inside the block.

    On CUDA, PyTorch's own sync debug mode reports every synchronising call (a device read, a
    blocking copy, an explicit synchronize). A CPU never waits, so there each read of a
    float or bool tensor's values (item, tolist, bool, float, ...) is counted: on CUDA every
    one would be a wait. Integer tensors are left out: on a CPU they are the batches' token ids,
    which stay on the host (`model.check_batch` reads them there); the step's own numbers and
    flags are floats and bools.
    """
    counter = SyncCounter()
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        counter.count = sum("synchroniz" in str(w.message) for w in caught)
        return
    with _CountReads(counter):
        yield counter


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

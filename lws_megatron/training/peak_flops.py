"""The peak FLOP/s that MFU is measured against, and where the figure comes from.

A GPU's peak is its data sheet's dense bf16 tensor-core figure. A CPU has no data-sheet figure
that means anything for PyTorch, so its peak is measured once per machine (host, CPU model,
threads, torch version) as the best fp32 matrix multiply over several tries, and cached in
`~/.cache/lws-megatron/peak_flops.json`: every later run on the machine divides by the same
figure, instead of a fresh measurement that a busy moment makes 4x too low or high. Only one
process measures at a time (an OS file lock, released if it dies) so that the ranks of a run
do not share the cores while measuring. `LWS_PEAK_FLOPS` sets a known peak instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lws_megatron.fileio import write_json_atomic

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets
# (SXM boards; "H100 PCIe" 756e12 is matched first).
GPU_PEAKS = {
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}
ENV = "LWS_PEAK_FLOPS"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lws-megatron"


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """The device's peak FLOP/s for MFU (0: unknown, MFU not reported), and its source."""
    if os.environ.get(ENV):
        return float(os.environ[ENV]), f"{ENV}={os.environ[ENV]}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAKS.items():
            if fragment in name:
                return peak, f"{name} data sheet (bf16 dense, {peak / 1e12:.0f} TFLOP/s)"
        return 0.0, f"{name}: peak unknown, MFU not reported (set {ENV})"
    return cpu_peak_flops()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return f"{socket.gethostname()} | {cpu} | {threads} threads | torch {torch.__version__}"


def cpu_peak_flops(cache: Path = CACHE) -> tuple[float, str]:
    """This machine's cached CPU peak, measured (under the lock) if it has none yet."""
    key = _machine()
    path = cache / "peak_flops.json"
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "peak_flops.lock"):
        known = _read(path)
        entry = known.get(key)
        valid = isinstance(entry, dict) and isinstance(entry.get("measured"), str)
        if not (valid and isinstance(entry.get("flops"), float) and entry["flops"] > 0):
            known[key] = {
                "flops": measure_matmul_flops(),
                "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            with contextlib.suppress(OSError):
                write_json_atomic(path, known)
    entry = known[key]
    source = (
        f"CPU peak {entry['flops'] / 1e9:.1f} GFLOP/s: best fp32 matmul over "
        f"{torch.get_num_threads()} threads, measured once on this machine {entry['measured']} "
        f"({path})"
    )
    return float(entry["flops"]), source


@contextlib.contextmanager
def _locked(path: Path):
    try:
        handle = open(path, "a")
    except OSError:  # a read-only home: measure without the lock
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def measure_matmul_flops(n: int = 1024, tries: int = 20) -> float:
    """The best of `tries` n x n fp32 matrix multiplies, in FLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best

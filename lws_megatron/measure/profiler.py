"""Where a step's time goes: torch's profiler over a few steps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lws_megatron.device import synchronize

_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


@dataclass(frozen=True)
class OpTime:
    name: str
    calls_per_step: float
    ms_per_step: float


@dataclass(frozen=True)
class StepProfile:
    """Where a step's time goes: device (GPU kernel) time against wall time, the kernels the
    host launched, and the operators that took longest (self time, on the GPU where one ran)."""

    wall_ms_per_step: float
    busy_ms_per_step: float
    launches_per_step: float
    top: list[OpTime]


def profile_steps(
    run_step: Callable[[], object], device: torch.device, steps: int = 2, top: int = 12
) -> StepProfile:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    ranked = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)
    return StepProfile(
        wall_ms_per_step=1000 * wall,
        busy_ms_per_step=sum(self_us(e) for e in ranked) / 1000 / steps,
        launches_per_step=sum(e.count for e in events if e.key in _LAUNCHES) / steps,
        top=[OpTime(e.key, e.count / steps, self_us(e) / 1000 / steps) for e in ranked[:top]],
    )

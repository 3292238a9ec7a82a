"""`python -m lws_megatron.memory CONFIG [key=value ...]`: peak memory per pipeline stage, measured
beside the planner's estimate, and the losses of the steps that reached it.

Runs `--steps` training steps of the config through the runtime's own TrainModule on synthetic
tokens (memory does not depend on the data), in one process or under torchrun with one process
per rank. Peak: on CUDA `max_memory_allocated`; on the CPU, which keeps no such count, the bytes
of live tensor storages, followed through torch's dispatcher from before the model is built
(`LiveTensorBytes`, eager only). Rank 0 prints a row per pipeline stage: the most any of its
ranks held, and the planner's estimate for that stage (`planner.stage_memory`).
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from lws_megatron.config import Config, config_name, load_config
from lws_megatron.device import default_device
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.measure.batches import synthetic_batch
from lws_megatron.planner import stage_memory
from lws_megatron.training import distributed
from lws_megatron.training.train_module import TrainModule


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of CPU tensor storages alive, and their peak, while the mode is on.

    Every storage an operator returns is counted once, until it is freed (a weak reference's
    finalizer); storages made before the mode, or outside the dispatcher, are not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


@dataclass(frozen=True)
class StageMemory:
    stage: int
    estimate_bytes: int
    measured_bytes: int

    @property
    def ratio(self) -> float:
        return self.measured_bytes / self.estimate_bytes


@dataclass(frozen=True)
class MemoryReport:
    config: str
    device: str
    layout: str | None
    stages: list[StageMemory]
    losses: list[float]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "stages": [{**asdict(s), "ratio": s.ratio} for s in self.stages],
        }


def measure(config: Config, name: str, steps: int) -> MemoryReport | None:
    """Train `steps` steps of `config` on this rank; the report on global rank 0."""
    if default_device().type == "cpu" and config.train.compile != "none":
        raise UserError(
            f"train.compile={config.train.compile}: the CPU's memory count follows eager "
            "operators only; measure with train.compile=none (or on a GPU)"
        )
    device = distributed.init_processes()
    tracker = LiveTensorBytes() if device.type == "cpu" else None
    with distributed.model_parallel(config) as plan, tracker or _CudaPeak(device):
        module = TrainModule(config, plan, device)
        module.compile()
        losses = []
        for step in range(steps):
            batches = [
                synthetic_batch(config, plan.micro_batch_size, seed=step * 1000 + i)
                for i in range(plan.micro_batches)
            ]
            losses.append(module.train_batch(batches).loss)
        losses = [float(loss) for loss in losses]
        peak = tracker.peak if tracker else torch.cuda.max_memory_allocated(device)
        stage = ps.get_pipeline_model_parallel_rank()
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (stage, peak))
    if dist.get_rank() != 0:
        return None
    estimates = stage_memory(config, plan, device.type)
    measured = [max(p for s, p in peaks if s == r) for r in range(plan.pp)]
    return MemoryReport(
        config=name,
        device=device.type,
        layout=plan.layout,
        stages=[StageMemory(r, estimates[r], measured[r]) for r in range(plan.pp)],
        losses=losses,
    )


class _CudaPeak:
    """CUDA's peak counter, reset when entered."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc) -> None:
        return None


def render_text(report: MemoryReport) -> str:
    lines = [
        f"{report.config} on {report.device}, layout {report.layout or 'even split'}",
        f"{'stage':<7}{'estimate':>14}{'measured':>14}{'measured/estimate':>20}",
    ]
    for s in report.stages:
        lines.append(
            f"{s.stage:<7}{_mib(s.estimate_bytes):>14}{_mib(s.measured_bytes):>14}{s.ratio:>20.3f}"
        )
    lines.append("losses: " + " ".join(f"{loss:.7f}" for loss in report.losses))
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lws_megatron.memory", description=__doc__)
    parser.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    parser.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return run(parser.parse_intermixed_args(argv))


@cli_entry
def run(args: argparse.Namespace) -> int:
    paths = [item for item in args.items if "=" not in item]
    if len(paths) != 1:
        raise UserError(f"give exactly one config file, got {len(paths)}: {' '.join(paths)}")
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: must be at least 1")
    config = load_config(paths[0], [item for item in args.items if "=" in item])
    report = measure(config, config_name(paths[0]), args.steps)
    if report is not None:
        print(json.dumps(report.to_dict(), indent=1) if args.json else render_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long a checkpoint save holds up training, written in the caller against in the background.

    python launch/checkpoint_bench.py [--out DIR] [--gib 1.0] [--repeat 3]

Two states, each saved `--repeat` times synchronously (`checkpoint.async_save=false`: the caller
writes and hashes every file) and as many times asynchronously (the caller takes host copies of
its state; a thread writes them): the crown demo's train module (weights, fp32 masters and Adam
moments, ZeRO 1) and a synthetic state of `--gib` GiB of fp32 tensors. For each it prints the
median time `save()` held the caller both ways, the median time until the asynchronous save was
complete, and the ratio blocked / synchronous. One process on gloo; the first asynchronous save
also allocates the host buffers the later ones reuse, and is reported apart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CROWN = ROOT / "configs" / "demo" / "crown.yaml"


class SyntheticState:
    """A train module's `state_dict()` of `gib` GiB of fp32 tensors of 64 Mi elements each."""

    def __init__(self, gib: float) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        count = max(1, round(gib * 4))  # 256 MiB each
        self.tensors = [
            ShardedTensor.from_rank_offsets(f"synthetic.{i}", torch.randn(64 << 20))
            for i in range(count)
        ]

    def state_dict(self, loading: bool = False):
        return {"sharded": self.tensors, "common": {"optimizer_step": 0}, "rank": {}}


def _timed(checkpointer, module, steps: range) -> list[tuple[float, float]]:
    """(seconds save() held the caller, seconds until the save was complete) per step."""
    times = []
    for step in steps:
        began = time.perf_counter()
        checkpointer.save(module, step, {})
        blocked = time.perf_counter() - began
        checkpointer.wait()
        times.append((blocked, time.perf_counter() - began))
    return times


def measure(name: str, module, out: Path, repeat: int) -> dict[str, float]:
    from lws_megatron.training.checkpoint import Checkpointer

    rows = {}
    for mode in (False, True):
        root = out / f"{name}-{'async' if mode else 'sync'}"
        shutil.rmtree(root, ignore_errors=True)
        ck = Checkpointer(root, 1, {"bench": name}, {"tp": 1}, async_save=mode)
        rows[mode] = _timed(ck, module, range(1, repeat + 2 if mode else repeat + 1))
        shutil.rmtree(root, ignore_errors=True)
    sync = statistics.median(b for b, _ in rows[False])
    first, *steady = rows[True]
    blocked = statistics.median(b for b, _ in steady)
    done = statistics.median(d for _, d in steady)
    return {
        "sync_s": sync,
        "first_async_blocked_s": first[0],
        "async_blocked_s": blocked,
        "async_complete_s": done,
        "ratio": blocked / sync,
    }


def _crown_module():
    from lws_megatron.config import load_config
    from lws_megatron.training.distributed import initialize_model_parallel, resolve_plan
    from lws_megatron.training.train_module import TrainModule

    config = load_config(CROWN, ["zero.stage=1"])
    plan = resolve_plan(config, 1)
    initialize_model_parallel(plan, config.train.seed)
    return TrainModule(config, plan, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: /tmp)")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the synthetic state")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.out))
    store = dist.FileStore(str(out / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    crown = _crown_module()
    states = {"crown demo": crown, f"synthetic {args.gib:g} GiB": SyntheticState(args.gib)}
    print(
        "| state | bytes | sync save (s) | async: step blocked (s) | blocked / sync | "
        "async complete (s) | first async blocked (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, module in states.items():
        size = sum(t.data.numel() * t.data.element_size() for t in module.state_dict()["sharded"])
        row = measure(name.split()[0], module, out, args.repeat)
        print(
            f"| {name} | {size / 2**20:,.0f} MiB | {row['sync_s']:.3f} | "
            f"{row['async_blocked_s']:.3f} | {row['ratio']:.1%} | {row['async_complete_s']:.3f} "
            f"| {row['first_async_blocked_s']:.3f} |",
            flush=True,
        )
    dist.destroy_process_group()
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it; one process here
    raise SystemExit(main())

"""Atomic, rotating checkpoints that restore a run exactly.

Layout under `run.dir/checkpoints/`:
  step_00000100/meta.json      the step, data position and the model/layout fingerprint
  step_00000100/pp{P}/...      DeepSpeed engine state of pipeline stage P (weights, ZeRO shards)
  step_00000100/rng/rank{R}.pt every rank's RNG states
  latest                       the name of the newest complete checkpoint

Everything is written under `step_N.tmp/` and renamed by rank 0 once every rank is done, so a
crash while saving leaves the previous checkpoint and `latest` untouched. DeepSpeed names files
by tensor-parallel rank, so each pipeline stage writes into a directory of its own.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from lws_megatron.errors import UserError
from lws_megatron.fileio import write_text_atomic

_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, fingerprint: dict[str, Any]):
        self.root = run_dir / "checkpoints"
        self.keep = keep
        self.fingerprint = fingerprint

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        return path if (path / "meta.json").is_file() else None

    def save(self, engine, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `state` is the run state to restore (data position,
        counters); it must be the same on every rank."""
        rank = dist.get_rank()
        name = f"{_PREFIX}{step:08d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp / f"pp{ps.get_pipeline_model_parallel_rank()}"),
                               tag="state", save_latest=False)
        torch.save(rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            meta = {"step": step, "state": state, "fingerprint": self.fingerprint}
            write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text_atomic(self.root / "latest", name + "\n")
            self._prune()
        dist.barrier()
        return final

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore weights, optimizer, RNG; return the saved run state. Refuses other layouts."""
        meta = json.loads((path / "meta.json").read_text())
        self._check_fingerprint(path, meta["fingerprint"])
        loaded, _ = engine.load_checkpoint(
            str(path / f"pp{ps.get_pipeline_model_parallel_rank()}"), tag="state",
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise UserError(f"{path}: checkpoint files are missing for this rank; it is incomplete")
        set_rng_state(torch.load(path / "rng" / f"rank{dist.get_rank():05d}.pt", weights_only=False))
        return {"step": meta["step"], **meta["state"]}

    def _check_fingerprint(self, path: Path, saved: dict[str, Any]) -> None:
        different = [k for k in sorted(set(saved) | set(self.fingerprint))
                     if saved.get(k) != self.fingerprint.get(k)]
        if different:
            detail = "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, this run "
                               f"{_short(self.fingerprint.get(k))}" for k in different)
            raise UserError(
                f"{path} was written by a different model or parallel layout ({detail}); resume "
                "with the same model and parallel settings, or start a fresh run.dir"
            )

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints; drop leftovers of saves that crashed."""
        for stale in self.root.glob(f"{_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        done = sorted(self.root.glob(f"{_PREFIX}*"))
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."

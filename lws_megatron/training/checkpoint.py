"""Checkpoints that restore a run exactly, are never lost, and load without running code.

Layout under `run.dir/checkpoints/`:
  step_00000100/meta.json      step, run state, model/layout fingerprint, every file's sha256
  step_00000100/pp{P}/...      DeepSpeed engine state of pipeline stage P (weights, ZeRO shards)
  step_00000100/rng/rank{R}.pt every rank's RNG states (tensors and numbers only)
  latest                       the name of the newest complete checkpoint (for people and tools)

A save writes `step_N.tmp/`, hashes what was written, and is renamed into place by rank 0 once
every rank is done; only then are older checkpoints pruned (each renamed `step_N.pruned` before
it is deleted), so a crash or a full disk while saving leaves the previous checkpoints untouched
and the partial one is removed. A write that fails on one rank fails the save on every rank:
none is left waiting in a collective. A resume takes the newest checkpoint whose files match
their recorded hashes; a damaged one (or one whose meta.json is no record) is set aside as
`step_N.damaged` with a warning and the one before it is used. Every file is read with
`torch.load(weights_only=True)`: tensors, numbers and, for DeepSpeed's optimizer state, three
plain DeepSpeed classes; anything else is refused. DeepSpeed names files by tensor-parallel rank,
so each pipeline stage writes into a directory of its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from lws_megatron.errors import UserError
from lws_megatron.fileio import os_errors, sha256_file, write_text_atomic
from lws_megatron.training.distributed import agreed

_NAME = re.compile(r"^step_(\d{8})$")
FORMAT = 2  # meta.json with file hashes, weights-only files
# What DeepSpeed's ZeRO optimizer state holds besides tensors: an enum, a dataclass of two
# ints and the (static) loss scaler; none runs code when rebuilt.
_DEEPSPEED_GLOBALS = [ZeroStageEnum, fragment_address, LossScaler]


def safe_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """torch.load that only rebuilds tensors, numbers and DeepSpeed's plain state classes."""
    with torch.serialization.safe_globals(_DEEPSPEED_GLOBALS), warnings.catch_warnings():
        # PyTorch's warning on a crafted file's pickle protocol asks to file an issue
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserError(
                f"{path}: refused to load: it holds objects that could run code "
                f"({_refused_object(err)}); move its checkpoint aside to resume from an "
                "earlier one, or start a new run.dir"
            ) from None


def _refused_object(err: pickle.UnpicklingError) -> str:
    """What the file asked for, without PyTorch's advice (to load it unsafely, or to allow
    the object), which a user of a crafted file must not follow."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"it asks for {found.group(1)}, which is neither a tensor nor a number"
    return "not only tensors and numbers"


def save_file(obj: Any, path: str | os.PathLike, zipfile: bool = True) -> None:
    """torch.save whose failed write surfaces as the OSError it is (a full disk, a quota, a
    file-size limit): torch itself reports one as a RuntimeError that has lost the cause."""
    sink = _Sink(path)
    try:
        torch.save(obj, sink, _use_new_zipfile_serialization=zipfile)
    except (RuntimeError, OSError):
        if sink.error is None:
            raise
        raise OSError(sink.error.errno, sink.error.strerror, os.fspath(path)) from None
    finally:
        os.close(sink.fd)


class _Sink:
    """The file torch.save writes to, keeping the first OSError of its writes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            self.error = self.error or err
            raise
        return len(data)

    def flush(self) -> None:
        pass


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading through `safe_load` (its own unpickles) and
    saving through `save_file`. A failed write (a full disk) is held, not raised, and the save's
    later writes skipped (`_held_failures`)."""

    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.failure: OSError | None = None

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)

    def held(self, write: Callable[..., Any], *args: Any) -> None:
        """`write(*args)` unless a write failed before; its OSError kept, not raised."""
        if self.failure is None:
            try:
                write(*args)
            except OSError as err:
                self.failure = err

    def makedirs(self, path, exist_ok=False) -> None:
        self.held(super().makedirs, path, exist_ok)

    def save(self, state_dict, path: str) -> None:
        self.held(save_file, state_dict, path, self.zipfile_serialization)


@contextlib.contextmanager
def _held_failures(engine) -> Iterator[None]:
    """DeepSpeed's save with every failed write raised only once it returns: it runs
    collectives between its writes, in which the other ranks would wait forever for a rank that
    raised. Its copy of its recovery scripts (zero_to_fp32.py) bypasses the checkpoint engine."""
    writer: SafeCheckpointEngine = engine.checkpoint_engine
    writer.failure = None
    engine._copy_recovery_script = functools.partial(writer.held, engine._copy_recovery_script)
    try:
        yield
    finally:
        del engine._copy_recovery_script  # DeepSpeed's own method again
    failure, writer.failure = writer.failure, None
    if failure is not None:
        raise failure


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and numbers (loadable weights-only)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(
        (
            "MT19937",
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match and (path / "meta.json").is_file() else None


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, fingerprint: dict[str, Any]):
        self.root = run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.fingerprint = fingerprint

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if checkpoint_step(p) is not None]
        return sorted(found, key=checkpoint_step, reverse=True)

    def remove_partial(self) -> None:
        """Rank 0, before a run: what a crashed or disk-full save left is never a checkpoint,
        nor what a prune cut short left (`step_N.pruned`, or from earlier versions a step
        directory without its meta.json, older than a complete checkpoint)."""
        complete = self.complete()
        newest = checkpoint_step(complete[0]) if complete else -1
        for path in self.root.glob("step_*"):
            step = _NAME.match(path.name)
            unrecorded = step and int(step.group(1)) < newest and path not in complete
            if path.suffix in (".tmp", ".pruned") or (unrecorded and path.is_dir()):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, engine, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `state` is the run state to restore (data position,
        counters); it must be the same on every rank."""
        rank, name = dist.get_rank(), f"step_{step:08d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        try:  # a full disk anywhere fails every rank, in every phase
            agreed(lambda: _start(tmp) if rank == 0 else None)
            agreed(lambda: self._write(engine, tmp))
            files = _gathered(
                {
                    rel: {"bytes": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
                    for rel in _my_share(_files(tmp))
                }
            )
            meta = {
                "format": FORMAT,
                "step": step,
                "state": state,
                "fingerprint": self.fingerprint,
                "files": dict(sorted(files.items())),
            }
            agreed(lambda: _commit(tmp, final, meta) if rank == 0 else None)
        except UserError as err:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"checkpoint {name} was not saved: {err}; the checkpoints before it are kept"
            ) from None
        if rank == 0:
            self._prune(step)
        dist.barrier()
        return final

    def _write(self, engine, tmp: Path) -> None:
        with os_errors(tmp):
            with _held_failures(engine):
                engine.save_checkpoint(
                    str(tmp / f"pp{ps.get_pipeline_model_parallel_rank()}"),
                    tag="state",
                    save_latest=False,
                )
            save_file(rng_state(), tmp / "rng" / f"rank{dist.get_rank():05d}.pt")

    def resume(self, engine) -> dict[str, Any] | None:
        """Collective: restore the newest intact checkpoint; None when the run has none."""
        for path in self.complete():
            problem = _verify(path)
            if problem is None:
                return agreed(lambda: self._load(engine, path))
            if dist.get_rank() == 0:
                damaged = path.with_name(path.name + ".damaged")
                shutil.rmtree(damaged, ignore_errors=True)
                os.replace(path, damaged)
                print(
                    f"warning: {path} is damaged ({problem}); set aside as {damaged.name}, "
                    "resuming from the checkpoint before it",
                    flush=True,
                )
            dist.barrier()
        if any(self.root.glob("step_*.damaged")):
            raise UserError(
                f"no intact checkpoint left in {self.root} (the damaged ones are set "
                "aside as step_*.damaged); restore one, or start a new run.dir"
            )
        return None

    def _load(self, engine, path: Path) -> dict[str, Any]:
        """Restore weights, optimizer, RNG; return the saved run state. Refuses other layouts."""
        meta = json.loads((path / "meta.json").read_text())
        self._check_fingerprint(path, meta["fingerprint"])
        loaded, _ = engine.load_checkpoint(
            str(path / f"pp{ps.get_pipeline_model_parallel_rank()}"),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise UserError(f"{path}: checkpoint files are missing for this rank; it is incomplete")
        set_rng_state(safe_load(path / "rng" / f"rank{dist.get_rank():05d}.pt"))
        return {"step": meta["step"], "path": str(path), **meta["state"]}

    def _check_fingerprint(self, path: Path, saved: dict[str, Any]) -> None:
        seed = self.fingerprint.get("seed")
        if saved.get("seed", seed) != seed:  # checkpoints before the seed was recorded pass
            raise UserError(
                f"{path} was trained with train.seed={saved['seed']} and this run sets "
                f"train.seed={seed}, which would change the data order from here on; resume "
                f"with train.seed={saved['seed']}, or start a new run.dir for the new seed"
            )
        different = [
            k
            for k in sorted(set(saved) | set(self.fingerprint))
            if k != "seed" and saved.get(k) != self.fingerprint.get(k)
        ]
        if different:
            detail = "; ".join(
                f"{k}: checkpoint {_short(saved.get(k))}, this run "
                f"{_short(self.fingerprint.get(k))}"
                for k in different
            )
            raise UserError(
                f"{path} was written by a different model or parallel layout ({detail}); resume "
                "with the same model and parallel settings, or start a fresh run.dir"
            )

    def _prune(self, saved: int) -> None:
        """Keep the newest `keep` checkpoints, never one newer than the save just completed."""
        older = [p for p in self.complete() if checkpoint_step(p) < saved]
        for old in older[self.keep - 1 :]:
            doomed = old.with_name(old.name + ".pruned")  # no checkpoint, even if cut short
            with contextlib.suppress(OSError):  # one that cannot be moved is kept
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)


def _start(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    with os_errors(tmp):
        (tmp / "rng").mkdir(parents=True)


def _commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Rank 0: record the hashes, then put the checkpoint in place in one rename."""
    with os_errors(tmp):
        write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(final.parent / "latest", final.name + "\n")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _my_share(items: list[str]) -> list[str]:
    """Round-robin share of a list that every rank sees alike (files on the shared filesystem)."""
    return items[dist.get_rank() :: dist.get_world_size()]


def _verify(path: Path) -> str | None:
    """Collective: every recorded file there, with its recorded size and hash, or what is not."""
    meta = _meta(path)
    if meta is None:
        return "its meta.json is not a checkpoint record"
    files = meta["files"]
    problems = []
    for rel in _my_share(sorted(files)):
        target, want = path / rel, files[rel]
        if not target.is_file():
            problems.append(f"{rel} is missing")
        elif target.stat().st_size != want["bytes"]:
            problems.append(f"{rel} has {target.stat().st_size} bytes, {want['bytes']} written")
        elif sha256_file(target) != want["sha256"]:
            problems.append(f"{rel} does not match its recorded sha256")
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, problems)
    found = [p for rank in gathered for p in rank]
    if not files:
        found.append("it records no files")
    return "; ".join(found[:3]) or None


def _meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's meta.json when it is a record of this format; None when it is none
    (unreadable, or not what a save writes: damaged). Another format is refused."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (ValueError, OSError):
        return None
    if not isinstance(meta, dict):
        return None
    if "format" not in meta and {"step", "fingerprint"} <= meta.keys():
        raise UserError(
            f"{path} was written by an earlier lws-megatron, whose checkpoints load "
            "by unpickling; it is not loaded: start a new run.dir"
        )
    if type(meta.get("format")) is int and meta["format"] != FORMAT:
        raise UserError(
            f"{path} is in checkpoint format {meta['format']}, this lws-megatron reads format "
            f"{FORMAT}: resume it with the version that wrote it, or start a new run.dir"
        )
    kinds = {"format": int, "step": int, "state": dict, "fingerprint": dict, "files": dict}
    if not all(isinstance(meta.get(key), kind) for key, kind in kinds.items()):
        return None
    files = meta["files"].values()
    if not all(isinstance(f, dict) and {"bytes", "sha256"} <= f.keys() for f in files):
        return None
    return meta


def _gathered(part: dict) -> dict:
    """Every rank's dict merged, on every rank."""
    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."

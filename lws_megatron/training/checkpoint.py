"""Checkpoints that resume at any layout, are written by every rank at once in the background,
are never lost, and load without running code.

Layout under `run.dir/checkpoints/` (each `step_N` is a Megatron-Core torch_dist checkpoint,
`shards.py`):
  step_00000100/meta.json        step, run state, model/data fingerprint, the saving layout and
                                 every file's size and sha256
  step_00000100/__{R}_0.distcp   rank R's boxes of the model's and optimizer's global tensors
  step_00000100/.metadata        where each box of each tensor lies (DCP's metadata)
  step_00000100/metadata.json    Megatron's format marker; common.pt: the optimizer step count
  step_00000100/rng/rank{R}.pt   rank R's RNG states
  latest                         the name of the newest complete checkpoint (for people, tools)

What is saved is the train module's `state_dict()`: Megatron ShardedTensors, each a box of a
global tensor (`model_state.py`), so a checkpoint resumes at another TP, PP, layout, DP or ZeRO
stage; only the model's shapes, the data and the global batch must match (`fingerprint`).

A save (collective) takes host copies of this rank's boxes, then writes them into
`step_N.tmp/` (each rank its own file, hashing it as it writes), in a background thread when
`checkpoint.async_save`; the step goes on meanwhile. Once every rank's files are complete
(`poll` at the steps where the host reads the step numbers, or `wait`), rank 0 writes the
metadata and `meta.json`, renames the directory into place, and only then prunes older
checkpoints; a second save first waits for the first. A crash or a full disk while saving
leaves the previous checkpoints untouched; what a crash leaves is removed at the next start.
A resume takes the newest checkpoint whose files, as far as this rank reads them, match their
recorded hashes; a damaged one is set aside as `step_N.damaged` and the one before it is used.
Tensors and numbers are all a file may hold: anything else is refused (`shards.safe_load`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lws_megatron.errors import UserError
from lws_megatron.fileio import os_error_line, os_errors, sha256_file, write_text_atomic
from lws_megatron.training import shards
from lws_megatron.training.distributed import agreed
from lws_megatron.training.shards import Slice, safe_load

_NAME = re.compile(r"^step_(\d{8})$")
FORMAT = 3  # torch_dist files, layout-free; 2: DeepSpeed engine files per layout


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match and (path / "meta.json").is_file() else None


def _rng_file(rank: int) -> str:
    return f"rng/rank{rank:05d}.pt"


@dataclass
class _Save:
    """A save whose files are being written: what the writer reports, once it has finished."""

    step: int
    state: dict[str, Any]
    tmp: Path
    thread: threading.Thread | None = None
    written: shards.Written | None = None
    error: tuple[str, str] | None = None  # (user | bug, text)
    ready: Any = None  # a CUDA event the host copies wait for


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        keep: int,
        fingerprint: dict[str, Any],
        layout: dict[str, Any],
        async_save: bool = False,
    ):
        self.root = run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.fingerprint, self.layout, self.async_save = fingerprint, layout, async_save
        self.rank = dist.get_rank()
        # Completion checks and the writers' reports travel on gloo, off the training stream.
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        self.pending: _Save | None = None
        self.blocked_s = 0.0  # how long the last save() held its caller
        self._buffers: list[torch.Tensor] = []  # host copies, reused by every async save

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

    # -- saving ---------------------------------------------------------------------------

    def save(self, module, step: int, state: dict[str, Any]) -> list[Path]:
        """Collective: save `module.state_dict()` as step `step`, with the run state `state`
        (the same on every rank). Returns the checkpoints this call completed: the one before
        (whose save it waited for) and, unless it is written in the background, this one."""
        done = self.wait()
        save = _Save(step, state, self.root / f"step_{step:08d}.tmp")
        began = time.perf_counter()
        content = module.state_dict()
        slices = [Slice.of(t) for t in content["sharded"]]
        if self.async_save:
            slices, save.ready = self._host_copies(slices)
            save.thread = threading.Thread(
                target=self._write, args=(save, slices, content), name="checkpoint", daemon=True
            )
            save.thread.start()
        else:
            self._write(save, [_compact(s) for s in slices], content)
        self.blocked_s = time.perf_counter() - began  # what the step waited for, if async
        self.pending = save
        return done if self.async_save else done + self.wait()

    def _host_copies(self, slices: list[Slice]) -> tuple[list[Slice], Any]:
        """Each slice copied to a host buffer kept from the last save; on CUDA queued behind
        the step's kernels (the writer waits for the event), in pinned memory."""
        cuda = any(s.tensor.is_cuda for s in slices)
        copies = []
        for i, s in enumerate(slices):
            if i == len(self._buffers):
                self._buffers.append(torch.empty(0))
            buffer = self._buffers[i]
            if buffer.shape != s.tensor.shape or buffer.dtype != s.tensor.dtype:
                buffer = torch.empty(s.tensor.shape, dtype=s.tensor.dtype, pin_memory=cuda)
                self._buffers[i] = buffer
            buffer.copy_(s.tensor.detach(), non_blocking=cuda)
            copies.append(Slice(s.key, s.global_shape, s.offset, buffer))
        del self._buffers[len(slices) :]
        if not cuda:
            return copies, None
        event = torch.cuda.Event()
        event.record()
        return copies, event

    def _write(self, save: _Save, slices: list[Slice], content: dict[str, Any]) -> None:
        """This rank's files, each hashed as written (the writer thread, or the caller)."""
        try:
            (save.tmp / "rng").mkdir(parents=True, exist_ok=True)
            if save.ready is not None:
                save.ready.synchronize()
            written = shards.write_slices(save.tmp, shards.data_file(self.rank), slices)
            rng = _rng_file(self.rank)
            written.files[rng] = shards.write_file(
                save.tmp / rng, lambda s: torch.save(content["rank"], s)
            )
            if self.rank == 0:
                written.files[shards.COMMON] = shards.write_file(
                    save.tmp / shards.COMMON, lambda s: torch.save(content["common"], s)
                )
            save.written = written
        except OSError as err:
            save.error = ("user", _disk_error(save.tmp, err))
        except Exception:
            save.error = ("bug", traceback.format_exc())

    def poll(self) -> list[Path]:
        """Collective (where every rank reads the step numbers): complete the save in flight
        if every rank's files are written; the checkpoints completed."""
        if self.pending is None:
            return []
        writing = torch.tensor(
            [int(self.pending.thread is not None and self.pending.thread.is_alive())]
        )
        dist.all_reduce(writing, group=self.group)
        return [] if writing.item() else self.wait()

    def wait(self) -> list[Path]:
        """Collective: wait for the save in flight and complete it."""
        save, self.pending = self.pending, None
        if save is None:
            return []
        if save.thread is not None:
            save.thread.join()
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, save.error, group=self.group)
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        name = f"step_{save.step:08d}"
        try:
            if failed:
                rank, (kind, text) = failed[0]
                if kind != "user":
                    raise RuntimeError(f"rank {rank} failed to write checkpoint {name}:\n{text}")
                raise UserError(text)
            written = [None] * dist.get_world_size() if self.rank == 0 else None
            dist.gather_object(save.written, written, dst=0, group=self.group)
            agreed(lambda: self._complete(save, written) if self.rank == 0 else None)
        except UserError as err:
            raise UserError(
                f"checkpoint {name} was not saved: {err}; the checkpoints before it are kept"
            ) from None
        finally:
            if self.rank == 0:
                shutil.rmtree(save.tmp, ignore_errors=True)  # gone once renamed into place
        return [self.root / name]

    def _complete(self, save: _Save, written: list[shards.Written]) -> None:
        """Rank 0, every rank's files written: metadata, meta.json, rename, `latest`, prune."""
        name = f"step_{save.step:08d}"
        try:
            metadata = shards.build_metadata(written)
        except RuntimeError as err:
            raise UserError(f"{err} (a bug; please report it)") from None
        with os_errors(save.tmp):
            files = {rel: info for part in written for rel, info in part.files.items()}
            files.update(shards.write_metadata(save.tmp, metadata))
            meta = {
                "format": FORMAT,
                "step": save.step,
                "state": save.state,
                "fingerprint": self.fingerprint,
                "layout": self.layout,
                "files": dict(sorted(files.items())),
            }
            write_text_atomic(save.tmp / "meta.json", json.dumps(meta, indent=1))
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(save.tmp, final)
            write_text_atomic(self.root / "latest", name + "\n")
            _fsync_dir(self.root)
        self._prune(save.step)

    def _prune(self, saved: int) -> None:
        """Keep the newest `keep` checkpoints, never one newer than the save just completed;
        each is renamed out of the checkpoints first, so that a kill midway leaves no
        half-deleted one behind that looks complete."""
        older = [p for p in self.complete() if checkpoint_step(p) < saved]
        for old in older[self.keep - 1 :]:
            doomed = old.with_name(old.name + ".pruned")
            with contextlib.suppress(OSError):  # one that cannot be moved is kept
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # -- resuming -------------------------------------------------------------------------

    def resume(self, module) -> dict[str, Any] | None:
        """Collective: restore the newest intact checkpoint; None when the run has none."""
        for path in self.complete():
            wanted = module.state_dict(loading=True)
            checked = agreed(lambda: self._check(path, wanted))
            problems: list = [None] * dist.get_world_size()
            dist.all_gather_object(problems, checked["problem"])
            problem = "; ".join(p for p in problems if p)
            if not problem:
                return agreed(lambda: self._load(path, module, wanted, checked))
            if self.rank == 0:
                damaged = path.with_name(path.name + ".damaged")
                shutil.rmtree(damaged, ignore_errors=True)
                os.replace(path, damaged)
                print(
                    f"warning: {path} is damaged ({problem}); set aside as {damaged.name}, "
                    "resuming from the checkpoint before it",
                    flush=True,
                )
            dist.barrier()
        if self.root.is_dir() and any(self.root.glob("step_*.damaged")):
            raise UserError(
                f"no intact checkpoint left in {self.root} (the damaged ones are set "
                "aside as step_*.damaged); restore one, or start a new run.dir"
            )
        return None

    def _check(self, path: Path, wanted: dict[str, Any]) -> dict[str, Any]:
        """This rank's view of `path`: refused (UserError), damaged (`problem`) or the reads
        it needs, every file among them verified."""
        meta = _read_meta(path)
        if meta is None:
            return {"problem": "its meta.json is not a checkpoint record"}
        self._check_fingerprint(path, meta["fingerprint"])
        files = meta["files"]
        head = [shards.METADATA, shards.COMMON, self._rng_source(meta)]
        problem = _verify(path, files, head)
        if problem:
            return {"problem": problem}
        metadata = shards.read_metadata(path / shards.METADATA)
        plan = shards.plan_reads(metadata, [Slice.of(t) for t in wanted["sharded"]], path)
        return {
            "problem": _verify(path, files, sorted(plan)),
            "meta": meta,
            "plan": (metadata, plan),
        }

    def _load(self, path: Path, module, wanted: dict[str, Any], checked: dict) -> dict[str, Any]:
        meta = checked["meta"]
        with torch.no_grad():
            shards.read_planned(path, *checked["plan"])
        wanted["common"] = safe_load(path / shards.COMMON)
        wanted["rank"] = safe_load(path / self._rng_source(meta))
        module.load_state_dict(wanted)
        return {"step": meta["step"], "path": str(path), "layout": meta["layout"], **meta["state"]}

    def _rng_source(self, meta: dict[str, Any]) -> str:
        """This rank's RNG file at the saving layout; at another layout, rank 0's."""
        return _rng_file(self.rank if meta["layout"] == self.layout else 0)

    def _check_fingerprint(self, path: Path, saved: dict[str, Any]) -> None:
        keys = sorted(set(saved) | set(self.fingerprint))
        different = [k for k in keys if saved.get(k) != self.fingerprint.get(k)]
        if not different:
            return
        seed = saved.get("train.seed")
        if "train.seed" in different:
            raise UserError(
                f"{path} was trained with train.seed={seed} and this run sets "
                f"train.seed={self.fingerprint.get('train.seed')}, which would change the data "
                f"order from here on; resume with train.seed={seed}, or start a new run.dir "
                "for the new seed"
            )
        batch = "train.global_batch_size"
        if different == [batch]:
            raise UserError(
                f"{path} was saved with {batch}={saved[batch]} and this run has "
                f"{self.fingerprint[batch]}: the data position is counted in global batches; "
                f"resume with {batch}={saved[batch]} (TP, PP, DP, ZeRO and the micro batch size "
                "may change), or start a new run.dir"
            )
        detail = "; ".join(
            f"{k}: checkpoint {_short(saved.get(k))}, this run {_short(self.fingerprint.get(k))}"
            for k in different
        )
        raise UserError(
            f"{path} was written by a different model or data ({detail}); resume with the "
            "settings it was saved with, or start a new run.dir"
        )


def _read_meta(path: Path) -> dict[str, Any] | None:
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
    found = meta.get("format")
    if type(found) is int and found != FORMAT and {"step", "fingerprint"} <= meta.keys():
        raise UserError(
            f"{path} is in checkpoint format {found}, this lws-megatron reads format {FORMAT} "
            "(layout-free); resume it with the version that wrote it, or start a new run.dir"
        )
    kinds = {"format": int, "step": int, "state": dict, "fingerprint": dict, "layout": dict}
    if found != FORMAT or not all(isinstance(meta.get(k), t) for k, t in kinds.items()):
        return None
    files = meta.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and {"bytes", "sha256"} <= f.keys() for f in files.values()
    ):
        return None
    return meta


def _verify(path: Path, files: dict[str, Any], rels: list[str]) -> str | None:
    """The first problems of these files against their recorded size and sha256."""
    problems = []
    for rel in rels:
        target, want = path / rel, files.get(rel)
        if want is None:
            problems.append(f"{rel} is not recorded in meta.json")
        elif not target.is_file():
            problems.append(f"{rel} is missing")
        elif target.stat().st_size != want["bytes"]:
            problems.append(f"{rel} has {target.stat().st_size} bytes, {want['bytes']} written")
        elif sha256_file(target) != want["sha256"]:
            problems.append(f"{rel} does not match its recorded sha256")
    return "; ".join(problems[:3]) or None


def _compact(s: Slice) -> Slice:
    """A host tensor holding just the slice: torch.save writes a view's whole storage."""
    t = s.tensor.detach()
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if t.is_cuda or not whole:
        t = t.to("cpu", copy=True) if t.is_cuda else t.clone(memory_format=torch.contiguous_format)
    return Slice(s.key, s.global_shape, s.offset, t)


def _disk_error(tmp: Path, err: OSError) -> str:
    return os_error_line(err, tmp) or f"{tmp}: {err}; check the filesystem there"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_full(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of a checkpoint (default: every model weight), in fp32, without a process
    group; every file read is verified first."""
    meta = _read_meta(path)
    if meta is None:
        raise UserError(f"{path}/meta.json is not a checkpoint record; it is damaged")
    problem = _verify(path, meta["files"], [shards.METADATA])
    metadata = None if problem else shards.read_metadata(path / shards.METADATA)
    if problem:
        raise UserError(f"{path} is damaged ({problem}); use another checkpoint")
    tensors = metadata.state_dict_metadata
    keys = keys or [k for k in tensors if not k.startswith("optimizer.")]
    out = {k: torch.empty(tuple(tensors[k].size), dtype=torch.float32) for k in keys}
    wanted = [Slice(k, tuple(t.shape), (0,) * t.dim(), t) for k, t in out.items()]
    plan = shards.plan_reads(metadata, wanted, path)
    problem = _verify(path, meta["files"], sorted(plan))
    if problem:
        raise UserError(f"{path} is damaged ({problem}); use another checkpoint")
    shards.read_planned(path, metadata, plan)
    return out

"""One process measuring the GPU measurement's rows (`rows.ROWS`): each model built once,
each row switched in place on it, checked, measured and written the moment it is done.

Each row's record goes to `rows.jsonl` as one JSON line, and a line for the console is
printed, so a process stopped at its time limit has handed over every row it finished. A
row's checks are what its figures rest on: its first step's loss against the same weights
run in fp32, no host wait inside a sync-free row's steps, no graph break in a compiled one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import json
import lzma
import os
import time
import traceback
from pathlib import Path
from typing import Iterator

import torch
from torch.func import functional_call

from lws_megatron.benchmark import measure
from lws_megatron.config import load_config
from lws_megatron.device import autocast
from lws_megatron.measure.batches import global_batch
from lws_megatron.measure.ceiling import gemm_ceiling
from lws_megatron.measure.compile_cache import load_compile_cache, save_compile_cache
from lws_megatron.measure.results import PREFIX, check, row_line
from lws_megatron.measure.rows import BASELINE, Build, Row, Sizes, Switches, on_device
from lws_megatron.measure.rows import skip_reason as row_skip_reason
from lws_megatron.model.compile import check_cuda_graphs
from lws_megatron.training import distributed
from lws_megatron.training.train_module import TrainModule


def say(line: str) -> None:
    print(PREFIX + line, flush=True)


@dataclasses.dataclass
class Built:
    module: TrainModule
    graphs: bool | None = None  # the compiled mode's CUDA graphs; None: not compiled yet
    seconds: float = 0.0


class Session:
    """The measuring process: its device, the models built so far, its deadline."""

    def __init__(self, sizes: Sizes, scratch: Path, deadline: float) -> None:
        self.sizes, self.scratch, self.deadline = sizes, scratch, deadline
        self.device = distributed.init_processes()
        self.cuda = self.device.type == "cuda"
        self.built: dict[Build, Built] = {}
        self.broken: dict[Build, Exception] = {}  # a failed build fails its later rows at once
        self.transformer_engine = transformer_engine_reason(self.cuda)  # None: it can run
        self.longest: dict[str, float] = {}  # seconds of the longest row of each kind so far
        self.records = (scratch / "rows.jsonl").open("a")

    def emit(self, record: dict) -> None:
        self.records.write(json.dumps(record) + "\n")
        self.records.flush()

    def config(self, build: Build):
        """The build's config at this run's sizes, CUDA graphs off until a row switches them."""
        m = self.sizes.micro_batch
        return load_config(
            build.path,
            [
                f"train.micro_batch_size={m}",
                f"train.global_batch_size={m}",
                *build.overrides(),
                "train.cuda_graphs=false",
                *self.sizes.overrides,
            ],
        )

    def header(self, cache: Path | None) -> dict:
        te = self.transformer_engine
        record = {
            "kind": "device",
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "gpus": torch.cuda.device_count() if self.cuda else 0,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformer_engine": te or "importable",
            "compile_cache": load_cache(cache),
            "load_average": os.getloadavg(),
            "gemm": gemm_ceiling(self.config(BASELINE)),
        }
        self.emit(record)
        gemm = ", ".join(
            f"{g['gemm']} {g['shape']} {g['tflops']:.1f} TFLOP/s" for g in record["gemm"]
        )
        say(f"{record['device']} x{record['gpus']}, torch {record['torch']}, CUDA {record['cuda']}")
        say(f"Transformer Engine: {te or 'importable'}; compile cache: {record['compile_cache']}")
        say(f"matmul ceiling ({record['gemm'][0]['dtype']}): {gemm}")
        return record

    def run(self, rows: list[tuple[int, Row]], cache: Path | None) -> None:
        header = self.header(cache)
        last_use = {on_device(row, self.cuda)[0]: index for index, row in rows}
        plan = distributed.resolve_plan(self.config(BASELINE), 1)
        distributed.initialize_model_parallel(plan, self.config(BASELINE).train.seed)
        for index, row in rows:
            record = {"index": index, "row": row.name, "config": row.build.config}
            record.update(self.run_row(row, header["gpus"]))
            self.emit(record)
            say(row_line(record))
            self.release(index, last_use)
            save_compile_cache(self.scratch / "compile_cache.bin")
        distributed.destroy_model_parallel()

    def run_row(self, row: Row, gpus: int) -> dict:
        """The row measured, or why not: it cannot run here, or it would not fit the time
        left, judged by the longest earlier row of its kind (a new build, a recompile, a
        switch alone)."""
        reason = row_skip_reason(row, self.cuda, gpus, self.transformer_engine)
        if reason:
            return {"status": "skipped", "reason": reason}
        build, switches, _ = on_device(row, self.cuda)
        kind = self.kind(build, switches)
        left = self.deadline - time.monotonic()
        needed = max(self.longest.get(kind, 0.0), self.sizes.min_row_s)
        if left < needed:
            return {
                "status": "not run",
                "reason": f"out of time ({left:.0f} s left, {kind} rows take {needed:.0f} s)",
            }
        record = {"kind": kind, **self.measure_row(row)}
        self.longest[kind] = max(self.longest.get(kind, 0.0), record["seconds"])
        return record

    def kind(self, build: Build, switches: Switches) -> str:
        built = self.built.get(build)
        if built is None:
            return "build"
        unchanged = built.graphs == switches.cuda_graphs and all(
            chunk.fused == switches.fused_loss for chunk in built.module.chunks
        )
        return "switch" if unchanged or build.compile == "none" else "compile"

    def measure_row(self, row: Row) -> dict:
        started = time.monotonic()
        build, switches, notes = on_device(row, self.cuda)
        record: dict = {
            "build": dataclasses.asdict(build),
            "switches": dataclasses.asdict(switches),
            "notes": notes,
        }
        try:
            new = build not in self.built
            built = self.build(build)
            record["build_seconds"] = built.seconds if new else 0.0
            self.switch(built, switches)
            reference = fp32_loss(built.module)
            result = measure(
                built.module,
                build.path,
                self.sizes.steps,
                self.sizes.warmup,
                profile=row.profile,
                read_every_step=not switches.sync_free,
            )
        except Exception as err:  # the row fails, the next rows still run
            traceback.print_exc()
            return {
                **record,
                "status": "failed",
                "error": f"{type(err).__name__}: {err}".splitlines()[0],
                "seconds": time.monotonic() - started,
            }
        checks, failures = check(result.to_dict(), reference, switches.sync_free)
        return {
            **record,
            "status": "failed" if failures else "measured",
            "error": "; ".join(failures) or None,
            "checks": checks,
            "seconds": time.monotonic() - started,
            "result": result.to_dict(),
        }

    def build(self, build: Build) -> Built:
        if build in self.broken:
            raise self.broken[build]
        if build not in self.built:
            started = time.monotonic()
            try:
                config = self.config(build)
                module = TrainModule(config, distributed.resolve_plan(config, 1), self.device)
            except Exception as err:
                self.broken[build] = err
                raise
            self.built[build] = Built(module, seconds=time.monotonic() - started)
        return self.built[build]

    def switch(self, built: Built, switches: Switches) -> None:
        """Set the row's switches on a built model: the fused head in place (a compiled
        chunk recompiles under its guards), CUDA graphs by compiling in the other mode."""
        module = built.module
        config = module.config
        module.config = dataclasses.replace(
            config,
            train=dataclasses.replace(config.train, cuda_graphs=switches.cuda_graphs),
            model=dataclasses.replace(config.model, fused_loss=switches.fused_loss),
        )
        if switches.cuda_graphs:
            check_cuda_graphs(config.train.compile, module.device, module.plan.tp, module.plan.pp)
        for chunk in module.chunks:
            chunk.fused = switches.fused_loss
        if built.graphs != switches.cuda_graphs:
            module.compile()
            built.graphs = switches.cuda_graphs

    def release(self, index: int, last_use: dict[Build, int]) -> None:
        """Free the models no later row uses."""
        for build in [b for b in self.built if last_use[b] <= index]:
            del self.built[build]
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _fp32_matmuls() -> Iterator[None]:
    """Full fp32 matrix multiplies on CUDA (no TF32), for a reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fp32_loss(module: TrainModule) -> float:
    """The global batch's mean loss per token at the module's current weights, run eagerly in
    fp32: weights and buffers upcast, no autocast, no TF32, the compiled graphs bypassed. The
    weights stay untouched (bf16 values are exact in fp32)."""
    (chunk,) = module.chunks
    named = [*chunk.named_parameters(), *chunk.named_buffers()]
    tensors = {name: t.float() if t.is_floating_point() else t for name, t in named}
    total, count = 0.0, 0.0
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), _fp32_matmuls():
        with autocast(module.device, torch.float32):
            for batch in global_batch(module.config, module.plan):
                batch = {k: v.to(module.device) for k, v in batch.items()}
                args = (batch["tokens"], None, None)
                per_token = functional_call(chunk, tensors, args, {"labels": batch["labels"]})
                total += (per_token.float() * batch["loss_mask"]).sum().item()
                count += batch["loss_mask"].sum().item()
    return total / count


def transformer_engine_reason(cuda: bool) -> str | None:
    """Why Transformer Engine's spec can't run here; None when it can."""
    if not cuda:
        return "Transformer Engine needs a CUDA device"
    if importlib.util.find_spec("transformer_engine") is None:
        return "Transformer Engine is not installed here (no transformer_engine package)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken install: the reason, not a failed run
        return f"transformer_engine.pytorch does not import: {err}".splitlines()[0]
    return None


def load_cache(path: Path | None) -> str:
    """Load an earlier run's compiled kernels; what became of them, in words."""
    if path is None or not path.exists():
        return "none"
    try:
        loaded = load_compile_cache(path)
    except (OSError, lzma.LZMAError, EOFError) as err:
        return f"unreadable, compiling cold ({err})"
    return f"loaded from {path}" if loaded else f"nothing to load in {path}"


def run_session(
    scratch: Path,
    indices: list[int],
    rows: list[Row],
    sizes: Sizes,
    seconds: float,
    cache: Path | None,
) -> int:
    """The launcher's measuring process: `rows[i]` for i in `indices`, within `seconds`."""
    deadline = time.monotonic() + seconds
    session = Session(sizes, scratch, deadline)
    session.run([(i, rows[i]) for i in indices], cache)
    return 0

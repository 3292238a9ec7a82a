"""The GPU measurement's rows, in order of value: what each measures, built how, switched how.

A `Build` is what only a new model can change (the config, the weights' precision, the layer
spec, the compile mode); `Switches` are what a built model changes in place between rows
(CUDA graphs, the fused loss, reading the step's numbers every step). Rows of one build share
its model, so one process builds each model once. Nothing here imports torch: the launcher
reads the rows before any process touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Build:
    config: str  # a config under configs/paper/
    precision: str = "bf16"  # train.precision
    attention_backend: str = "sdpa"  # model.attention_backend
    compile: str = "model"  # train.compile

    @property
    def path(self) -> str:
        return f"configs/paper/{self.config}.yaml"

    def overrides(self) -> list[str]:
        """Built with the fused head, which `Switches.fused_loss` turns off in place."""
        return [
            f"train.precision={self.precision}",
            f"model.attention_backend={self.attention_backend}",
            f"train.compile={self.compile}",
            "model.fused_loss=true",
        ]


@dataclass(frozen=True)
class Switches:
    cuda_graphs: bool = True  # train.cuda_graphs: the compiled step captured and replayed
    fused_loss: bool = True  # model.fused_loss: the head and its cross-entropy over chunks
    sync_free: bool = True  # the step's numbers read once per log interval, not every step

    def overrides(self) -> list[str]:
        return [f"train.cuda_graphs={self.cuda_graphs}", f"model.fused_loss={self.fused_loss}"]


ALL_ON, ALL_OFF = Switches(), Switches(cuda_graphs=False, fused_loss=False, sync_free=False)


@dataclass(frozen=True)
class Row:
    name: str
    build: Build
    switches: Switches = ALL_ON
    profile: bool = False  # two profiled steps: top kernels, GPU busy time, launches
    data_parallel: bool = False  # every GPU of the machine, under torchrun (launch/bench.py)


@dataclass(frozen=True)
class Sizes:
    micro_batch: int
    warmup: int  # CUDA graphs record on the second and replay from the third step
    steps: int
    min_row_s: float  # a row starts only with this much time left
    data_parallel_s: float  # kept for the data-parallel row, where it runs
    overrides: tuple[str, ...] = ()


BASELINE, CROWN = Build("baseline-18l"), Build("crown-18l")
AUTOCAST = replace(BASELINE, precision="bf16-autocast")
ROWS = [
    Row("all on", BASELINE, profile=True),
    Row("all on", CROWN, profile=True),
    Row("all but sync-free (numbers read every step)", BASELINE, replace(ALL_ON, sync_free=False)),
    Row("all but CUDA graphs", BASELINE, replace(ALL_ON, cuda_graphs=False)),
    Row("all but the fused loss", BASELINE, replace(ALL_ON, fused_loss=False)),
    Row("all but bf16 weights (fp32 weights, bf16 autocast)", AUTOCAST),
    Row("the step before: autocast, read every step, Megatron's head", AUTOCAST, ALL_OFF),
    Row(
        "Transformer Engine spec (eager)",
        replace(CROWN, attention_backend="te", compile="none"),
        replace(ALL_ON, cuda_graphs=False),
    ),
    Row("all on, data parallel over every GPU", CROWN, data_parallel=True),
]  # fmt: skip
GPU = Sizes(micro_batch=16, warmup=5, steps=20, min_row_s=30, data_parallel_s=120)
# SMOKE=1: the same rows on tiny shapes, a CPU test of the whole script.
SMOKE = Sizes(
    micro_batch=2,
    warmup=3,
    steps=3,
    min_row_s=5,
    data_parallel_s=90,
    overrides=(
        "model.d_model=128",
        "model.d_head=16",
        "model.num_layers=3",
        "model.vocab_size=512",
        "model.seq_length=64",
    ),
)


def on_device(row: Row, cuda: bool) -> tuple[Build, Switches, list[str]]:
    """The row as this device can run it, and what was changed: a CPU has no CUDA graphs and
    no bf16 autocast in Megatron's backward (train.precision explains), so there they are
    off and fp32."""
    build, switches, notes = row.build, row.switches, []
    if not cuda and switches.cuda_graphs:
        switches = replace(switches, cuda_graphs=False)
        notes.append("CUDA graphs off: no CUDA device")
    if not cuda and build.precision == "bf16-autocast":
        build = replace(build, precision="fp32")
        notes.append("fp32: bf16 autocast needs a CUDA device")
    return build, switches, notes


def skip_reason(row: Row, cuda: bool, gpus: int, transformer_engine: str | None) -> str | None:
    """Why the row cannot run here (None: it can). `transformer_engine`: why TE can't run."""
    if row.build.attention_backend == "te" and transformer_engine:
        return transformer_engine
    if row.data_parallel and cuda and gpus < 2:
        return f"{gpus} GPU: data parallelism needs at least two"
    return None

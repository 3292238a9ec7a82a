"""Training throughput on the current device: the runtime's own step, timed after a warm-up.

A step is what `launch/pretrain.py` runs (Megatron forward/backward, DeepSpeed optimizer step,
clipping, the global-token loss), on synthetic tokens so that no data is needed. `measure`
times a built module as it stands, so one build can be measured again after a switch
(the GPU measurement's rows); `bench_config` builds one and measures it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from lws_megatron.config import Config, config_name
from lws_megatron.device import default_device, synchronize
from lws_megatron.measure.batches import global_batch
from lws_megatron.measure.blocks import LayerTiming, time_layers
from lws_megatron.measure.comm import CommWaits
from lws_megatron.measure.profiler import OpTime, StepProfile, profile_steps
from lws_megatron.measure.syncs import sync_counts
from lws_megatron.model.compile import compile_stats
from lws_megatron.model.fused_loss import FusedLossGPTModel
from lws_megatron.model.spec import resolve_backend
from lws_megatron.training import data_parallel, distributed, forward
from lws_megatron.training.data import Batch
from lws_megatron.training.metrics import memory_gb
from lws_megatron.training.peak_flops import device_peak_flops
from lws_megatron.training.step_stats import StepStats
from lws_megatron.training.train_module import TrainModule


@dataclass(frozen=True)
class BenchResult:
    config: str
    device: str
    precision: str
    micro_batch_size: int
    seq_length: int
    steps: int
    tokens_per_s: float  # of the whole job: every data-parallel rank's tokens
    step_time_median_s: float
    step_time_min_s: float
    step_time_max_s: float
    mfu: float  # against the peak of every device of the job
    peak_flops: float  # of one device
    peak_memory_gb: float
    flops_per_token: int
    total_params: int
    compile: str
    layer_timings: list[LayerTiming]
    profile: StepProfile | None = None
    sdpa_kernel: str = "auto"
    compiled_graphs: int = 0  # more than one graph per chunk: a break or a recompile
    graph_breaks: int = 0
    syncs_per_step: float | None = None  # host waits for the device (device.count_syncs)
    read_every_step: bool = False  # the step numbers read after every step, as before
    syncs_in_steps: int = 0  # host waits inside the counted steps, their reads left out
    first_loss: float | None = None  # of the first warm-up step, read after it
    fused_loss: bool = False
    cuda_graphs: bool = False
    attention_backend: str = "sdpa"
    data_parallel: int = 1
    zero_stage: int = 0
    grad_wait_ms: float = 0.0  # medians: finalize, the gradient reduction left after backward
    optimizer_ms: float = 0.0  # the optimizer step (with ZeRO's weight gather if not overlapped)
    gather_wait_ms: float = 0.0  # per step, the forward's waits for ZeRO's weight gather

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> "BenchResult":
        profile = row.get("profile")
        return cls(
            **{
                **row,
                "layer_timings": [LayerTiming(**t) for t in row["layer_timings"]],
                "profile": profile
                and StepProfile(**{**profile, "top": [OpTime(**o) for o in profile["top"]]}),
            }
        )


def bench_config(
    config: Config,
    path: str,
    steps: int,
    warmup: int,
    time_each_layer: bool,
    profile: bool = False,
    read_every_step: bool = False,
) -> BenchResult:
    """Needs an initialised default process group (see launch/bench.py)."""
    device = default_device()
    with distributed.model_parallel(config) as plan:
        module = TrainModule(config, plan, device)
        with data_parallel.no_sync(module.model):
            layer_timings = (
                time_layers(
                    module.chunks[0],
                    config,
                    plan.micro_batch_size,
                    device,
                    module.args.autocast_dtype,
                )
                if time_each_layer
                else []
            )
        module.compile()
        return measure(module, path, steps, warmup, profile, read_every_step, layer_timings)


def measure(
    module: TrainModule,
    path: str,
    steps: int,
    warmup: int,
    profile: bool = False,
    read_every_step: bool = False,
    layer_timings: list[LayerTiming] | None = None,
) -> BenchResult:
    """`steps` timed training steps of a built module after `warmup` untimed ones (the first
    compiles, if anything does, and its loss is read); then, with `profile`, two profiled
    steps; then one log interval of steps with its host waits counted."""
    config, device = module.config, module.device
    before = compile_stats()
    batches = global_batch(config, module.plan)
    tokens = forward.loss_tokens(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_loss = module.train_batch(batches, tokens).loss.item() if warmup else None
    with CommWaits(module) as waits:
        times, total = _timed_steps(
            module, batches, tokens, max(warmup - 1, 0), steps, read_every_step
        )
    grad_wait_ms, optimizer_ms, gather_wait_ms = waits.medians_ms(steps)
    step_profile = (
        profile_steps(lambda: module.train_batch(batches, tokens), device) if profile else None
    )
    compiled = {k: v - before[k] for k, v in compile_stats().items()}
    # Last: on a CPU the counting is a torch function mode, which Dynamo recompiles under.
    every = 1 if read_every_step else config.train.log_interval
    in_steps, in_read = sync_counts(module, batches, tokens, every)
    described = _describe(module, path)
    tokens_per_s = config.train.global_batch_size * config.model.seq_length * steps / total
    peak = described["peak_flops"] * dist.get_world_size()
    return BenchResult(
        **described,
        steps=steps,
        tokens_per_s=tokens_per_s,
        step_time_median_s=statistics.median(times),
        step_time_min_s=min(times),
        step_time_max_s=max(times),
        mfu=tokens_per_s * described["flops_per_token"] / peak if peak else 0.0,
        peak_memory_gb=memory_gb(device),
        layer_timings=layer_timings or [],
        profile=step_profile,
        syncs_per_step=(in_steps + in_read) / every,
        read_every_step=read_every_step,
        syncs_in_steps=in_steps,
        first_loss=first_loss,
        grad_wait_ms=grad_wait_ms,
        optimizer_ms=optimizer_ms,
        gather_wait_ms=gather_wait_ms,
        **compiled,
    )


def _describe(module: TrainModule, path: str) -> dict:
    """What a result says about the step it measured, besides the measured figures."""
    config, device, chunk = module.config, module.device, module.chunks[-1]
    summary = config.summary()
    return {
        "config": config_name(path),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": module.precision.name,
        "micro_batch_size": module.plan.micro_batch_size,
        "seq_length": config.model.seq_length,
        "peak_flops": device_peak_flops(device)[0],
        "flops_per_token": summary.flops_per_token,
        "total_params": summary.total_params,
        "compile": config.train.compile,
        "sdpa_kernel": config.model.sdpa_kernel,
        "fused_loss": isinstance(chunk, FusedLossGPTModel) and chunk.fused,
        "cuda_graphs": config.train.cuda_graphs,
        "attention_backend": resolve_backend(config.model.attention_backend, device),
        "data_parallel": module.plan.dp,
        "zero_stage": config.zero.stage,
    }


def _timed_steps(
    module: TrainModule,
    batches: list[Batch],
    tokens: int,
    warmup: int,
    steps: int,
    read_every_step: bool,
) -> tuple[list[float], float]:
    """(seconds of each timed step, seconds of them all), stepping as the trainer does: the
    step numbers are read once per `train.log_interval`. On CUDA a step's time is the span
    between events queued after each step, so the host never waits in between; the total
    ends with the device done. `read_every_step`: wait for the device before each step and
    read its numbers after it (the old step)."""
    device, every = module.device, module.config.train.log_interval
    cuda = device.type == "cuda"
    stats = StepStats(device)
    marks = []
    for i in range(warmup + steps):
        if i == warmup:
            stats.read(time.perf_counter())
            synchronize(device)
            start = time.perf_counter()
        if i >= warmup:
            marks.append(_mark(cuda, read_every_step))
        stats.add(module.train_batch(batches, tokens))
        if read_every_step or (i + 1) % every == 0:
            stats.read(time.perf_counter())
    marks.append(_mark(cuda, read_every_step))
    synchronize(device)
    total = time.perf_counter() - start
    if cuda:
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])], total
    return [b - a for a, b in zip(marks, marks[1:])], total


def _mark(cuda: bool, wait: bool):
    """A point between steps: a CUDA event (timed on the device), or the host clock."""
    if not cuda:
        return time.perf_counter()
    if wait:
        torch.cuda.synchronize()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def render(results: list[BenchResult]) -> str:
    lines = [
        f"{'config':<16} {'device':<24} {'prec':<5} {'compile':<7} {'sdpa':<9} "
        f"{'tok/s':>10} {'MFU':>6} {'step ms (median, min-max)':>28} {'mem GB':>7} "
        f"{'syncs/step':>10} graphs/breaks"
    ]
    for r in results:
        graphs = f"{r.compiled_graphs}/{r.graph_breaks}" if r.compile != "none" else "-"
        lines.append(
            f"{r.config:<16} {r.device[:24]:<24} {r.precision:<5} {r.compile:<7} "
            f"{r.sdpa_kernel:<9} {r.tokens_per_s:>10,.0f} "
            f"{100 * r.mfu:>5.1f}% {1000 * r.step_time_median_s:>10.1f} "
            f"({1000 * r.step_time_min_s:.1f}-{1000 * r.step_time_max_s:.1f}){'':>4} "
            f"{r.peak_memory_gb:>7.2f} {_syncs(r):>10} {graphs}"
        )
    for r in results:
        if r.data_parallel > 1:
            lines.append(
                f"{r.config}: DP={r.data_parallel}, ZeRO {r.zero_stage}: of a "
                f"{1000 * r.step_time_median_s:.1f} ms step, {r.grad_wait_ms:.1f} ms waiting for "
                f"the gradient reduction after backward, {r.optimizer_ms:.1f} ms in the "
                f"optimizer step, {r.gather_wait_ms:.1f} ms waiting for the weight gather"
            )
    for r in results:
        if r.layer_timings:
            lines.append(
                f"\n{r.config}: forward+backward per layer shape, micro batch "
                f"{r.micro_batch_size} x {r.seq_length}"
            )
            for t in r.layer_timings:
                lines.append(
                    f"  ffn {t.ffn_hidden_size:>5}  heads {t.num_query_heads:>2}/"
                    f"{t.num_kv_heads:<2} {1000 * t.seconds:8.2f} ms  layers {t.layers}"
                )
    for r in results:
        if r.profile:
            lines += ["", *render_profile(r)]
    return "\n".join(lines)


def render_profile(r: BenchResult) -> list[str]:
    p = r.profile
    busy = (
        f"GPU kernels {p.busy_ms_per_step:.1f} ms, {p.launches_per_step:,.0f} kernel launches"
        if r.device != "cpu"
        else f"operators (self time) {p.busy_ms_per_step:.1f} ms"
    )
    lines = [f"{r.config}: a profiled step takes {p.wall_ms_per_step:.1f} ms, {busy}"]
    for o in p.top:
        lines.append(f"  {o.ms_per_step:8.2f} ms {o.calls_per_step:7.1f} x  {o.name[:90]}")
    return lines


def _syncs(r: BenchResult) -> str:
    if r.syncs_per_step is None:
        return "-"
    return f"{r.syncs_per_step:.2f}" + ("*" if r.read_every_step else "")

"""Training throughput on the current device: the runtime's own step, timed after a warm-up.

A step is what `launch/pretrain.py` runs (Megatron forward/backward, DeepSpeed optimizer step,
clipping, the global-token loss), on synthetic tokens so that no data is needed. Also times
each distinct layer shape's forward + backward alone, which is what the stage planner weighs,
and, on request, profiles two steps: the operators that take the time and the launches.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lws_megatron.config import Config, config_name
from lws_megatron.device import autocast, count_syncs, default_device, synchronize
from lws_megatron.fileio import ensure_dir, write_bytes_atomic
from lws_megatron.model.compile import compile_stats
from lws_megatron.model.fused_loss import FusedLossGPTModel
from lws_megatron.training import distributed, forward
from lws_megatron.training.data import Batch
from lws_megatron.training.metrics import memory_gb
from lws_megatron.training.peak_flops import device_peak_flops
from lws_megatron.training.step_stats import StepStats
from lws_megatron.training.train_module import TrainModule


@dataclass(frozen=True)
class LayerTiming:
    ffn_hidden_size: int
    num_query_heads: int
    num_kv_heads: int
    layers: list[int]
    seconds: float


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


@dataclass(frozen=True)
class BenchResult:
    config: str
    device: str
    precision: str
    micro_batch_size: int
    seq_length: int
    steps: int
    tokens_per_s: float
    step_time_median_s: float
    step_time_min_s: float
    step_time_max_s: float
    mfu: float
    peak_flops: float
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


def synthetic_batch(config: Config, micro: int, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    s = config.model.seq_length
    text = torch.randint(0, config.model.vocab_size, (micro, s + 1), generator=generator)
    return {
        "tokens": text[:, :-1].contiguous(),
        "labels": text[:, 1:].contiguous(),
        "loss_mask": torch.ones(micro, s),
    }


class BlockTimer:
    """Forward + backward of one micro batch through a built chunk's own blocks, alone: its
    input embedding, any run of its layers, its head (final norm, output layer, cross-entropy).

    What the benchmark reports per layer shape and what the pipeline planner calibrates on:
    the very Megatron modules that train, in the run's compute dtype and attention kernel.
    """

    def __init__(self, chunk, config: Config, micro: int, device: torch.device, dtype: torch.dtype):
        self.chunk, self.device, self.dtype = chunk, device, dtype
        s, d = config.model.seq_length, config.model.d_model
        batch = synthetic_batch(config, micro)
        self.tokens, self.labels = batch["tokens"].to(device), batch["labels"].to(device)
        self.hidden = torch.randn(s, micro, d, device=device)
        self.grad = torch.randn_like(self.hidden)
        self.rope = chunk.rotary_pos_emb(s)

    def step(self, embedding: bool, layers: list, head: bool) -> None:
        chunk = self.chunk
        with autocast(self.device, self.dtype):
            if embedding:
                x = chunk.embedding(input_ids=self.tokens, position_ids=None)
            else:
                x = self.hidden.detach().requires_grad_()
            for layer in layers:
                x, _ = layer(x, attention_mask=None, rotary_pos_emb=self.rope)
            if head:
                out = _head_loss(chunk, chunk.decoder.final_layernorm(x), self.labels).mean()
        if head:
            out.backward()
        else:
            x.backward(self.grad.to(x.dtype))

    def seconds(self, embedding: bool, layers: list, head: bool) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.step(embedding, layers, head)
        synchronize(self.device)
        return time.perf_counter() - start


def _head_loss(chunk, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The chunk's own head: output layer and cross-entropy, or the fused one."""
    if isinstance(chunk, FusedLossGPTModel):
        return chunk.head_loss(hidden, labels)
    weight = (
        chunk.shared_embedding_or_output_weight()
        if chunk.share_embeddings_and_output_weights
        else None
    )
    logits, _ = chunk.output_layer(hidden, weight=weight)
    return chunk.compute_language_model_loss(labels, logits).float()


def time_layers(
    chunk, config: Config, micro: int, device: torch.device, dtype: torch.dtype, repeats: int = 5
) -> list[LayerTiming]:
    """Forward + backward seconds of one micro batch through each distinct layer shape."""
    timer = BlockTimer(chunk, config, micro, device, dtype)
    shapes = config.summary().layers
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    layers = {}
    for layer in chunk.decoder.layers:
        shape = shapes[layer.layer_number - 1]
        key = (shape.ffn_hidden_size, shape.num_query_heads, shape.num_kv_heads)
        by_shape.setdefault(key, []).append(layer.layer_number - 1)
        layers.setdefault(key, layer)
    timings = []
    for key, layer in layers.items():
        best = min(timer.seconds(False, [layer], False) for _ in range(repeats + 1))
        timings.append(LayerTiming(*key, layers=by_shape[key], seconds=best))
    chunk.zero_grad(set_to_none=True)
    return timings


_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_steps(run_step, device: torch.device, steps: int = 2, top: int = 12) -> StepProfile:
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


def bench_config(
    config: Config,
    path: str,
    steps: int,
    warmup: int,
    time_each_layer: bool,
    profile: bool = False,
    read_every_step: bool = False,
) -> BenchResult:
    """Needs an initialised default process group of one rank (see launch/bench.py)."""
    device = default_device()
    with distributed.model_parallel(config) as plan:
        module = TrainModule(config, plan, device)
        layer_timings = (
            time_layers(
                module.chunks[0], config, plan.micro_batch_size, device, module.args.autocast_dtype
            )
            if time_each_layer
            else []
        )
        before = compile_stats()
        module.compile()
        batches = _global_batch(config, plan)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, total = _timed_steps(module, batches, warmup, steps, read_every_step)
        step_profile = (
            profile_steps(lambda: module.train_batch(batches), device) if profile else None
        )
        compiled = {k: v - before[k] for k, v in compile_stats().items()}
        # Last: on a CPU the counting is a torch function mode, which Dynamo recompiles under.
        syncs = _syncs_per_step(module, batches, read_every_step)
    summary = config.summary()
    tokens_per_s = config.train.global_batch_size * config.model.seq_length * steps / total
    peak, _ = device_peak_flops(device)
    return BenchResult(
        config=config_name(path),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision=module.precision.name,
        micro_batch_size=plan.micro_batch_size,
        seq_length=config.model.seq_length,
        steps=steps,
        tokens_per_s=tokens_per_s,
        step_time_median_s=statistics.median(times),
        step_time_min_s=min(times),
        step_time_max_s=max(times),
        mfu=tokens_per_s * summary.flops_per_token / peak if peak else 0.0,
        peak_flops=peak,
        peak_memory_gb=memory_gb(device),
        flops_per_token=summary.flops_per_token,
        total_params=summary.total_params,
        compile=config.train.compile,
        layer_timings=layer_timings,
        profile=step_profile,
        sdpa_kernel=config.model.sdpa_kernel,
        syncs_per_step=syncs,
        read_every_step=read_every_step,
        **compiled,
    )


def _timed_steps(
    module: TrainModule, batches: list[Batch], warmup: int, steps: int, read_every_step: bool
) -> tuple[list[float], float]:
    """(seconds of each timed step, seconds of them all), stepping as the trainer does: the
    step numbers are read once per `train.log_interval`. On CUDA a step's time is the span
    between events queued after each step, so the host never waits in between; the total
    ends with the device done. `read_every_step`: wait for the device before each step and
    read its numbers after it (the old step)."""
    device, every = module.device, module.config.train.log_interval
    cuda = device.type == "cuda"
    tokens = forward.loss_tokens(batches)
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


def _global_batch(config: Config, plan: distributed.ParallelPlan) -> list[Batch]:
    """Synthetic micro batches of one global batch."""
    return [
        synthetic_batch(config, plan.micro_batch_size, seed) for seed in range(plan.micro_batches)
    ]


def _steps(module: TrainModule, batches: list[Batch], stats: StepStats, count: int) -> None:
    """`count` training steps on the same batches, their numbers added to `stats`."""
    tokens = forward.loss_tokens(batches)
    for _ in range(count):
        stats.add(module.train_batch(batches, tokens))


def _syncs_per_step(module: TrainModule, batches: list[Batch], read_every_step: bool) -> float:
    """Host waits per step over one log interval of steps, read as the trainer reads."""
    every = 1 if read_every_step else module.config.train.log_interval
    stats = StepStats(module.device)
    with count_syncs(module.device) as counter:
        _steps(module, batches, stats, every)
        stats.read(time.perf_counter())
    synchronize(module.device)
    return counter.count / every


def first_sync(config: Config, warmup: int = 3, steps: int = 2) -> str | None:
    """Steady-state steps under `torch.cuda.set_sync_debug_mode("error")`, where any host wait
    for the device raises: None if there was none, else the error's first line. CUDA only;
    needs an initialised default process group of one rank."""
    device = default_device()
    with distributed.model_parallel(config) as plan:
        module = TrainModule(config, plan, device)
        module.compile()
        batches = _global_batch(config, plan)
        stats = StepStats(device)
        _steps(module, batches, stats, warmup)
        stats.read(time.perf_counter())
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            _steps(module, batches, stats, steps)
        except RuntimeError as err:
            return str(err).strip().splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stats.read(time.perf_counter())
    return None


def gemm_ceiling(config: Config, repeats: int = 20) -> list[dict]:
    """TFLOP/s of the compute dtype's matrix multiply at the step's shapes (tokens x d_model by
    the widest FFN, and by the vocabulary): what the step's matmuls could reach at best."""
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = config.train.micro_batch_size * config.model.seq_length
    widest = max(shape.ffn_hidden_size for shape in config.summary().layers)
    rows = []
    for name, n in (("ffn", widest), ("head", config.model.vocab_size)):
        a = torch.randn(tokens, config.model.d_model, device=device, dtype=dtype)
        b = torch.randn(config.model.d_model, n, device=device, dtype=dtype)
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        flops = 2 * tokens * config.model.d_model * n
        rows.append(
            {
                "gemm": name,
                "shape": [tokens, config.model.d_model, n],
                "dtype": str(dtype),
                "tflops": flops / seconds / 1e12,
            }
        )
    return rows


def load_compile_cache(path: Path) -> None:
    """Compiled kernels of an earlier process (torch.compiler's portable cache), if any."""
    if path.is_file():
        torch.compiler.load_cache_artifacts(path.read_bytes())


def save_compile_cache(path: Path) -> None:
    """What this process compiled or loaded, for the next process to skip compiling."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        ensure_dir(path.parent)
        write_bytes_atomic(path, saved[0])


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
            p = r.profile
            busy = (
                f"GPU kernels {p.busy_ms_per_step:.1f} ms, {p.launches_per_step:,.0f} kernel "
                "launches"
                if r.device != "cpu"
                else f"operators (self time) {p.busy_ms_per_step:.1f} ms"
            )
            lines.append(f"\n{r.config}: a profiled step takes {p.wall_ms_per_step:.1f} ms, {busy}")
            for o in p.top:
                lines.append(f"  {o.ms_per_step:8.2f} ms {o.calls_per_step:7.1f} x  {o.name[:90]}")
    return "\n".join(lines)


def _syncs(r: BenchResult) -> str:
    if r.syncs_per_step is None:
        return "-"
    return f"{r.syncs_per_step:.2f}" + ("*" if r.read_every_step else "")

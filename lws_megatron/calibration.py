"""Measured compute for the pipeline planner, on the Megatron layers that train.

Imported only by `plan --profile` and `plan --measure`. The model is built on this device at
TP=1, PP=1 (tensor parallelism scales every layer alike) with the run's compute dtype and
attention kernel, and `measure.blocks.BlockTimer` times its own blocks: forward + backward of one
micro batch (train.micro_batch_size x model.seq_length), the fastest of `repeats` runs after a
warm-up (interference from other work only ever adds time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from lws_megatron.config import Config
from lws_megatron.device import default_device, device_name
from lws_megatron.fileio import ensure_dir, write_text_atomic
from lws_megatron.measure.blocks import BlockTimer
from lws_megatron.model import build_model
from lws_megatron.planner.costs import Timings
from lws_megatron.shapes import LayerShape, padded_vocab_size
from lws_megatron.training import distributed
from lws_megatron.training.precision import resolve_precision
from lws_megatron.training.train_module import model_args

CACHE_FILE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "lws_megatron"
    / "layer_times.json"
)


@contextlib.contextmanager
def block_timer(config: Config) -> Iterator[BlockTimer]:
    """The whole model built on this device, alone, and a timer over its blocks."""
    # Plain layers: the cost model adds recomputation's forward to the times itself.
    parallel = dataclasses.replace(
        config.parallel, tp=1, pp=1, pipeline_layout="", recompute="none"
    )
    single = dataclasses.replace(config, parallel=parallel)
    if not dist.is_initialized():
        distributed.init_processes()
    device = default_device()
    with distributed.model_parallel(single) as plan:
        args = model_args(single, plan, device)
        model = build_model(args, seed=config.train.seed, device=device)
        yield BlockTimer(model, single, plan.micro_batch_size, device, args.autocast_dtype)


def device_label() -> str:
    return device_name(default_device())


def cache_key(config: Config) -> str:
    """What a timing depends on: device, precision, widths, sequence, micro batch, kernels."""
    dims, train = config.model, config.train
    precision = resolve_precision(train.precision, default_device()).name
    return (
        f"{device_label()}|{precision}|d_model={dims.d_model}|"
        f"d_head={dims.d_head}|seq={dims.seq_length}|micro_batch={train.micro_batch_size}|"
        f"qk_norm={dims.qk_norm}|sdpa={config.model.sdpa_kernel}|"
        f"fused_loss={config.model.fused_loss}|"
    )


def layer_timings(config: Config, *, repeats: int = 5, cache: Path | None = None) -> Timings:
    """Seconds per distinct layer shape, the embedding and the head, cached per device and shape."""
    cache = cache or CACHE_FILE
    prefix, vocab = cache_key(config), padded_vocab_size(config.model, config.parallel.tp)
    by_layer = config.summary().layers
    shapes = sorted(set(by_layer), key=str)
    keys = {
        s: prefix + f"ffn={s.ffn_hidden_size},q={s.num_query_heads},kv={s.num_kv_heads}"
        for s in shapes
    }
    keys["embedding"] = prefix + f"embedding vocab={vocab}"
    keys["output"] = prefix + f"output vocab={vocab}"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [block for block, key in keys.items() if key not in known]
    if missing:
        with block_timer(config) as timer:
            layer_of = {
                shape: timer.chunk.decoder.layers[i]
                for i, shape in reversed(list(enumerate(by_layer)))
            }
            runs = {
                block: (
                    block == "embedding",
                    [layer_of[block]] if isinstance(block, LayerShape) else [],
                    block == "output",
                )
                for block in missing
            }
            times = fastest_times(timer, runs, repeats)
        known.update({keys[block]: times[block] for block in missing})
        ensure_dir(cache.parent)
        write_text_atomic(cache, json.dumps(known, indent=1, sort_keys=True))
    return Timings(
        layers={s: known[keys[s]] for s in shapes},
        embedding=known[keys["embedding"]],
        output=known[keys["output"]],
    )


def time_splits(
    config: Config, splits: list[tuple[int, ...]], pp: int, *, repeats: int = 15
) -> list[list[float]]:
    """Per split, per rank: seconds of forward + backward of its chunks, timed directly."""
    with block_timer(config) as timer:
        layers = list(timer.chunk.decoder.layers)
        runs = {}
        for s, bounds in enumerate(splits):
            last = len(bounds) - 2
            for c in range(last + 1):
                runs[s, c] = (c == 0, layers[bounds[c] : bounds[c + 1]], c == last)
        times = fastest_times(timer, runs, repeats)
    result = []
    for s, bounds in enumerate(splits):
        ranks = [0.0] * pp
        for c in range(len(bounds) - 1):
            ranks[c % pp] += times[s, c]
        result.append(ranks)
    return result


def fastest_times(timer: BlockTimer, runs: dict, repeats: int) -> dict:
    """The fastest of `repeats` timings of each run; the runs alternate, so that drifts in the
    machine's speed fall on every run alike."""
    for run in runs.values():
        timer.step(*run)  # warm-up
    seconds = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            seconds[key].append(timer.seconds(*run))
    timer.chunk.zero_grad(set_to_none=True)
    return {key: min(s) for key, s in seconds.items()}

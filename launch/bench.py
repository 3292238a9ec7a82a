"""Training throughput of configs on this device: `python launch/bench.py CONFIG... [options]`.

Full training steps (forward, backward, optimizer) after a warm-up, on synthetic tokens, back
to back with the step's numbers read once per `train.log_interval`, as the trainer reads them:
tokens per second over the timed steps, step time (median, min-max), host waits for the device
per step, MFU against the shape engine's FLOPs and the device's peak, peak memory; each
distinct layer shape timed alone; with --profile, where the time of a step goes.

Under torchrun the processes train data-parallel (one per GPU, or gloo on CPUs): each runs
--micro-batch sequences a step, tokens/s and MFU count the whole job, and rank 0 prints; the
step is also split into the time it waited for the gradient reduction left when backward
ended, the time of the optimizer step, and the time the forward waited for ZeRO's all-gather
of the updated weights (measure/comm.py):
    torchrun --nproc_per_node 2 launch/bench.py configs/demo/crown.yaml zero.stage=1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lws_megatron.cli import add_configs, configs_and_overrides
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import load_config
from lws_megatron.errors import cli_entry


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("launch/bench.py", __doc__)
    add_configs(parser, many=True)
    parser.add_argument(
        "--micro-batch", type=int, help="sequences per step and process (one micro batch)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--compile",
        choices=("none", "layers", "model"),
        help="torch.compile each layer or each model chunk whole (default: train.compile)",
    )
    parser.add_argument(
        "--read-every-step",
        action="store_true",
        help="wait for the device before each step and read its numbers after it (marked *)",
    )
    parser.add_argument("--no-layer-times", action="store_true", help="skip per-layer timings")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile two more steps: top operators, device time, launches",
    )
    parser.add_argument(
        "--gemm",
        action="store_true",
        help="instead: the matmul TFLOP/s at the step's shapes (the ceiling), as JSON",
    )
    parser.add_argument(
        "--compile-cache",
        metavar="FILE",
        type=Path,
        help="load compiled kernels from FILE if it exists, save this run's there at the end",
    )
    parser.add_argument("--json", action="store_true", help="end with one line: a JSON list")
    return run(parser.parse_intermixed_args(argv))


@cli_entry
def run(args: argparse.Namespace) -> int:
    paths, overrides = configs_and_overrides(
        args, "launch/bench.py configs/paper/baseline-18l.yaml"
    )
    if args.compile:
        overrides = [f"train.compile={args.compile}", *overrides]
    configs = [load_config(p, overrides) for p in paths]
    if args.micro_batch:
        configs = [_micro_batch(p, c, args.micro_batch, overrides) for p, c in zip(paths, configs)]

    import torch
    import torch.distributed as dist

    from lws_megatron.benchmark import bench_config, render
    from lws_megatron.measure.ceiling import gemm_ceiling
    from lws_megatron.measure.compile_cache import load_compile_cache, save_compile_cache
    from lws_megatron.training.distributed import init_processes

    if args.gemm:
        print(json.dumps([row for config in configs for row in gemm_ceiling(config)]))
        return 0
    if args.compile_cache:
        load_compile_cache(args.compile_cache)
    init_processes()
    first = dist.get_rank() == 0
    results = []
    for path, config in zip(paths, configs):
        results.append(
            bench_config(
                config,
                path,
                args.steps,
                args.warmup,
                not args.no_layer_times,
                args.profile,
                args.read_every_step,
            )
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.compile_cache and first:
        save_compile_cache(args.compile_cache)
    if first:
        print(json.dumps([r.to_dict() for r in results]) if args.json else render(results))
    dist.destroy_process_group()
    return 0


def _micro_batch(path: str, config, micro: int, overrides: list[str]):
    """`config` with `micro` sequences per step on each data-parallel process of the job."""
    from lws_megatron.training.distributed import discover

    dp = max(discover().world_size // (config.parallel.tp * config.parallel.pp), 1)
    sizes = [f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * dp}"]
    return load_config(path, [*sizes, *overrides])


if __name__ == "__main__":
    sys.exit(main())

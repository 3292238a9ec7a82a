"""`python -m lws_megatron.model CONFIG [key=value ...] [--steps N]`: build the model, time steps.

Builds the config's model at its parallel.tp / parallel.pp split on this machine (CUDA if there
is one; launch with torchrun for more than one process) and times forward+backward of one global
batch of random tokens through Megatron's schedule, after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch

from lws_megatron.config import Config, load_config
from lws_megatron.errors import cli_entry


def time_steps(config: Config, steps: int, num_microbatches: int) -> list[float]:
    """Seconds of each of `steps` forward+backward passes of `num_microbatches` micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lws_megatron.model import build_model_chunks, forward_step, sync_model_parallel_grads

    chunks = build_model_chunks(config)
    device = next(chunks[0].parameters()).device
    shape = (config.train.micro_batch_size, config.model.seq_length)
    g = torch.Generator().manual_seed(config.train.seed)
    batches = [  # on the CPU, as a data loader hands them over
        {
            "tokens": torch.randint(0, config.model.vocab_size, shape, generator=g),
            "labels": torch.randint(0, config.model.vocab_size, shape, generator=g),
            "loss_mask": torch.ones(shape),
        }
        for _ in range(num_microbatches)
    ]
    schedule, step = get_forward_backward_func(), forward_step(config)
    many = parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None
    times = []
    for _ in range(steps + 1):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        iterators = [iter(batches) for _ in chunks]
        _synchronize(device)
        start = time.perf_counter()
        schedule(
            forward_step_func=step,
            data_iterator=iterators if many else iterators[0],
            model=chunks if many else chunks[0],
            num_microbatches=num_microbatches,
            seq_length=config.model.seq_length,
            micro_batch_size=config.train.micro_batch_size,
            forward_only=False,
        )
        sync_model_parallel_grads(chunks)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _single_process_env() -> None:
    """Outside torchrun: a world of one process on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lws_megatron.model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument(
        "--microbatches", type=int, default=None, help="per step (default: one global batch)"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    from megatron.core import parallel_state

    from lws_megatron.model import initialize_parallel
    from lws_megatron.model.build import compute_dtype, default_device

    _single_process_env()
    initialize_parallel(config)
    dp = parallel_state.get_data_parallel_world_size()
    micro = config.train.micro_batch_size
    num_microbatches = args.microbatches or max(1, config.train.global_batch_size // (micro * dp))
    times = time_steps(config, args.steps, num_microbatches)
    if torch.distributed.get_rank() == 0:
        tokens = num_microbatches * micro * config.model.seq_length * dp
        median = statistics.median(times)
        device = default_device()
        print(
            f"{args.config}: {config.summary().total_params / 1e6:.2f}M params, "
            f"tp={config.parallel.tp} pp={config.parallel.pp} dp={dp}, {device.type}, "
            f"{compute_dtype(config, device)}, {torch.get_num_threads()} threads"
        )
        print(
            f"step of {num_microbatches} x {micro} x {config.model.seq_length} tokens per DP rank: "
            f"{median:.3f} s (median of {len(times)}), {tokens / median:,.0f} tokens/s"
        )
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

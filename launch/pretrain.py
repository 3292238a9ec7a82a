"""Pre-train an LWS model:
`python launch/torchrun.py --nproc-per-node N launch/pretrain.py --config CONFIG [key=value ...]`
(or plain torchrun: see launch/torchrun.py for what it changes).

Also runs under `mpirun -np N` and `srun --mpi=pmix` (ranks from MPI), or as one plain process.
The runtime lives in lws_megatron.training; this file only reads the command line.
"""

from __future__ import annotations

import argparse
import signal
import sys

from lws_megatron.config import load_config
from lws_megatron.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo/crown.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.max_steps=50 parallel.tp=2",
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    # SLURM's pre-emption warning must not end the process before the runtime handles it (it
    # then checkpoints and exits); the runtime takes seconds to import.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    import torch.distributed as dist

    from lws_megatron.training.trainer import train

    try:
        train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

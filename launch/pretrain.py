"""Pre-train an LWS model:
`python launch/torchrun.py --nproc-per-node N launch/pretrain.py CONFIG [key=value ...]` (or
`--config CONFIG`; plain torchrun works too: launch/torchrun.py says what it changes).

Also runs under `mpirun -np N` and `srun --mpi=pmix` (ranks from MPI), or as one plain process.
`--print-config` prints the resolved config (base files and overrides applied) and exits. The
runtime lives in lws_megatron.training; this file only reads the command line.
"""

from __future__ import annotations

import signal
import sys

from lws_megatron.cli import add_configs, config_keys, configs_and_overrides, parser
from lws_megatron.config import dump_config, load_config
from lws_megatron.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cli = parser("launch/pretrain.py", __doc__, epilog=config_keys())
    add_configs(cli)
    cli.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    args = cli.parse_intermixed_args(argv)
    [path], overrides = configs_and_overrides(
        args, "launch/pretrain.py configs/demo/crown.yaml", exactly_one=True
    )
    config = load_config(path, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
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

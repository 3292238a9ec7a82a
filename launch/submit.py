"""Check a config against a SLURM allocation, write the job beside the run, and submit it.

    python launch/submit.py CONFIG --nodes N --gpus-per-node G [--partition P] [--time T]
        [--account A] [--qos Q] [--job-name J] [--launcher torchrun|mpi] [--max-restarts N]
        [--max-requeues N] [--dry-run] [key=value ...]

Before anything is queued: TP x PP must divide the world size (nodes x GPUs per node), the global
batch must split into micro-batches over the data-parallel ranks, every layer's heads must split
over TP and the pipeline layout (explicit, even, or the planner's for `auto`) must fit the model;
the tokenizer and data manifests must be where the config says. Then it writes
RUN_DIR/job/config.yaml (the config with its base files and overrides resolved) and
RUN_DIR/job/submit.sbatch (launch/slurm/pretrain.sbatch's launch part under this job's #SBATCH
lines), runs `sbatch` on it and prints the command and the job id. `--dry-run` writes and submits
nothing: it prints the batch script and the exact launch line.

Nothing from the config or the command line is pasted unquoted into a shell: overrides only reach
the job through the resolved config file, every path or name in the script is quoted, and the
comment naming the config file shows it escaped (repr), so a line break in it stays in the comment.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lws_megatron.cli import add_configs, configs_and_overrides
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import Config, dump_config, load_config
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import ensure_dir, write_text_atomic

if TYPE_CHECKING:
    from lws_megatron.training.distributed import ParallelPlan

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "launch" / "slurm" / "pretrain.sbatch"
MARKER = "# ---- launch:"
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_NAMES = re.compile(r"^[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*$")
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def time_seconds(value: str) -> int | None:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None: unlimited."""
    if value.lower() in ("unlimited", "infinite"):
        return None
    match = _TIME.match(value)
    if not match:
        raise UserError(f"--time {value!r}: write minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, dh, dm, ds, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:
        return days * 86400 + dh * 3600 + (dm or 0) * 60 + (ds or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60


def check(config: Config, nodes: int, per_node: int, unit: str, data_check: bool) -> ParallelPlan:
    """Refuse, with a UserError naming the values and the fix, what the allocation can't run:
    the same plan every rank resolves first (heads vs TP, the layout, the batch split)."""
    from lws_megatron.training.data import resolve_sources
    from lws_megatron.training.data_passes import passes_warning
    from lws_megatron.training.distributed import resolve_plan

    world = nodes * per_node
    plan = resolve_plan(
        config, world, f"--nodes {nodes} x {per_node} {unit} per node = {world} processes"
    )
    if data_check:
        sources = resolve_sources(config, verify=False)
        warning = passes_warning(config, sources.prefixes, sources.weights)
        if warning:
            print(warning, file=sys.stderr)
    return plan


def sbatch_value(option: str, value: str) -> str:
    """One #SBATCH value, quoted the way sbatch's own parser reads it: within double quotes,
    a backslash escapes the next character; an unquoted # would start a comment."""
    if "\n" in value or "\r" in value:
        raise UserError(
            f"{option} {value!r}: a line break can't go into a batch script's "
            "#SBATCH lines; choose a name or path without one"
        )
    if re.fullmatch(r"[A-Za-z0-9_.,:@%+=/-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(args: argparse.Namespace, config_path: Path, log_dir: Path, per_node: int) -> str:
    """The job: this allocation's #SBATCH lines, its environment, then the template's launch
    part."""
    text = TEMPLATE.read_text()
    head, sep, body = text.partition(MARKER)
    if not sep:
        raise RuntimeError(f"{TEMPLATE} lacks its '{MARKER}' line")
    options: dict[str, str | None] = {}
    for line in head.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].strip().partition("=")
            options[key] = value or None
    gpus = args.gpus_per_node is not None
    options.update(
        {
            "--job-name": args.job_name,
            "--nodes": str(args.nodes),
            "--ntasks-per-node": str(per_node if args.launcher == "mpi" else 1),
            "--signal": f"B:USR1@{args.warning}",
            "--output": str(log_dir).replace("%", "%%") + "/%x-%j.out",  # %% is a literal %
            "--chdir": os.getcwd(),
        }
    )
    if gpus:
        options["--gpus-per-node"] = str(args.gpus_per_node)
    for key in ("partition", "account", "qos", "time", "cpus_per_task"):
        value = getattr(args, key)
        if value is not None:
            options["--" + key.replace("_", "-")] = str(value)
    if args.exclusive:
        options["--exclusive"] = None
    lines = [
        "#!/bin/bash",
        f"# Written by launch/submit.py for {args.config!r}; the config, resolved, is "
        f"{config_path.name} beside this file.",
        "# Submit again as it is with: sbatch THIS_FILE",
    ]
    lines += [
        f"#SBATCH {key}" if value is None else f"#SBATCH {key}={sbatch_value(key, value)}"
        for key, value in options.items()
    ]
    env = {
        "LWS_HOME": str(ROOT),
        "LWS_PYTHON": sys.executable,
        "LWS_LAUNCHER": args.launcher,
        "LWS_NPROC_PER_NODE": str(per_node),
        "LWS_MAX_RESTARTS": str(args.max_restarts),
        "LWS_MAX_REQUEUES": str(args.max_requeues),
    }
    lines += [
        "",
        *(f"export {key}={shlex.quote(value)}" for key, value in env.items()),
        f"set -- {shlex.quote(str(config_path))}",
        "",
    ]
    return "\n".join(lines) + "\n" + sep + body


def launch_line(script: str, nodes: int) -> str:
    """The srun line the batch script will run, from the script itself (its dry-run mode)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch") as f:
        f.write(script)
        f.flush()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LWS_DRY_RUN": "1",
            "SLURM_NNODES": str(nodes),
        }
        proc = subprocess.run(["bash", f.name], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the batch script's dry run failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser("launch/submit.py", __doc__)
    add_configs(parser)
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--gpus-per-node", type=int, help="GPUs per node: one process per GPU")
    size.add_argument(
        "--procs-per-node",
        type=int,
        help="CPU-only nodes: this many processes per node, no GPUs requested",
    )
    parser.add_argument(
        "--launcher",
        choices=("torchrun", "mpi"),
        default="torchrun",
        help="torchrun per node, or one srun --mpi=pmix task per process",
    )
    parser.add_argument("--partition", help="SLURM partition(s)")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument("--qos", help="SLURM quality of service")
    parser.add_argument("--time", help="time limit, e.g. 2-00:00:00 or 90 (minutes)")
    parser.add_argument("--job-name", help="job name (default: lws-<config name>)")
    parser.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPUs per SLURM task: per node with torchrun, per process with mpi",
    )
    parser.add_argument("--exclusive", action="store_true", help="whole nodes only")
    parser.add_argument(
        "--warning",
        type=int,
        default=120,
        metavar="SECONDS",
        help="pre-emption warning: USR1 this long before the time limit (checkpoint, then requeue)",
    )
    add_restart_options(parser)
    parser.add_argument(
        "--skip-data-check",
        action="store_true",
        help="don't look for the tokenizer and data manifests from here",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the batch script and launch line; write and submit nothing",
    )
    args = parser.parse_intermixed_args(argv)
    [args.config], args.overrides = configs_and_overrides(
        args, "launch/submit.py configs/demo/crown.yaml --nodes 2 --gpus-per-node 8", True
    )
    return args


def add_restart_options(parser: argparse.ArgumentParser) -> None:
    """How often a failed run is started again: inside the job, then by a requeue."""
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="torchrun's restarts of the process group inside the job after a rank fails, "
        "each resuming from the newest checkpoint",
    )
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        metavar="N",
        help="requeues of a job whose run failed, pre-emptions included",
    )


def check_options(args: argparse.Namespace, per_node: int) -> None:
    """Refuse option values SLURM or torchrun would refuse later, or misread."""
    for option, value, least in (
        ("--nodes", args.nodes, 1),
        ("--gpus-per-node" if args.gpus_per_node is not None else "--procs-per-node", per_node, 1),
        ("--max-restarts", args.max_restarts, 0),
        ("--max-requeues", args.max_requeues, 0),
    ):
        if value < least:
            raise UserError(f"{option} {value}: must be at least {least}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task {args.cpus_per_task}: must be at least 1")
    if not 1 <= args.warning <= 65535:
        raise UserError(f"--warning {args.warning}: SLURM takes 1 to 65535 seconds")
    if args.time is not None:
        limit = time_seconds(args.time)
        if limit is not None and limit <= args.warning + 60:
            raise UserError(
                f"--time {args.time} ({limit} s) leaves no room before the pre-emption warning "
                f"{args.warning} s ahead of the limit; ask for more time or a smaller --warning"
            )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpus = args.gpus_per_node is not None
    per_node = args.gpus_per_node if gpus else args.procs_per_node
    check_options(args, per_node)
    config = load_config(args.config, args.overrides)
    default_name = re.sub(r"[^A-Za-z0-9_.+-]", "-", config.run.name or Path(args.config).stem)
    args.job_name = args.job_name or f"lws-{default_name}"
    checks = (
        ("--job-name", args.job_name, _NAME),
        ("--partition", args.partition, _NAMES),
        ("--account", args.account, _NAME),
        ("--qos", args.qos, _NAME),
    )
    for option, value, pattern in checks:
        if value is not None and not pattern.match(value):
            raise UserError(f"{option} {value!r}: use letters, digits and . _ + - only")

    unit = "GPUs" if gpus else "processes"
    plan = check(config, args.nodes, per_node, unit, not args.skip_data_check)
    run_dir = Path(config.run.dir).resolve()
    job_dir = run_dir / "job"
    config_path, script_path, log_dir = (
        job_dir / "config.yaml",
        job_dir / "submit.sbatch",
        job_dir / "logs",
    )
    script = render(args, config_path, log_dir, per_node)
    tp, pp = config.parallel.tp, config.parallel.pp
    print(
        f"{args.config}: {args.nodes} node(s) x {per_node} {unit} = {plan.world} processes: "
        f"TP {tp} x PP {pp} x DP {plan.dp}, pipeline layout {plan.layout or 'even split'}, "
        f"{plan.micro_batches} micro-batch(es) of {config.train.micro_batch_size} per step "
        f"and rank"
    )
    sbatch = ["sbatch", "--parsable", str(script_path)]
    if args.dry_run:
        print(f"# dry run: nothing written or submitted. The batch script ({script_path}):")
        print(script, end="")
        print("# the launch line it runs on the head node:")
        print(launch_line(script, args.nodes))
        print("# submit with: " + shlex.join(["sbatch", str(script_path)]))
        return 0

    ensure_dir(log_dir)
    write_text_atomic(config_path, dump_config(config))
    write_text_atomic(script_path, script)
    print(f"wrote {config_path} and {script_path}")
    print("$ " + shlex.join(sbatch), flush=True)
    proc = subprocess.run(sbatch, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the job ({proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; log: {log_dir / f'{args.job_name}-{job_id}.out'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

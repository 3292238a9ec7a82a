"""Train configs over several seeds, then report each profile's mean and spread.

    python launch/sweep.py CONFIG [CONFIG...] --seeds 1 2 3 [--nproc N] [--output DIR] \
        [key=value ...]

Each config trains once per seed (`train.seed=S`) in DIR/runs/<config name>/seed<S>, under one
`run.name` per config (the config's own, else its file name), so that the report groups the
seeds into one row: DIR/report/report.md gives the mean and sample standard deviation of the
final losses over the seeds. Runs go one after another, every config at the first seed before
the next seed, so a sweep cut short still compares all profiles. A run that fails is named at
the end and does not stop the others; the same command run again resumes the unfinished runs
from their checkpoints and does not train the finished ones again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from demo import pretrain

from lws_megatron.cli import Progress, add_configs
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import config_name, load_config
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.report import write_report

RESERVED = ("train.seed", "run.dir")  # the sweep sets these for every run


def parse_seeds(values: list[str] | None) -> list[int]:
    if not values:
        raise UserError("--seeds: give the seeds to train with, e.g. --seeds 1 2 3")
    seeds = []
    for value in values:
        try:
            seed = int(value)
        except ValueError:
            raise UserError(f"--seeds: {value!r} is not an integer seed") from None
        if seed in seeds:
            raise UserError(f"--seeds: seed {seed} is given twice; each seed trains once")
        seeds.append(seed)
    return seeds


def plan_runs(
    configs: list[str], seeds: list[int], overrides: list[str], out: Path
) -> list[tuple[str, int, Path, list[str]]]:
    """(config, seed, run directory, overrides) per run, every config checked at every seed
    before anything trains."""
    for item in overrides:
        if item.partition("=")[0].strip() in RESERVED:
            raise UserError(
                f"override {item!r}: the sweep sets {' and '.join(RESERVED)} for "
                "each run; give seeds with --seeds and the location with --output"
            )
    seen: dict[str, str] = {}
    for path in configs:
        stem = config_name(path)
        if stem in seen:
            raise UserError(
                f"configs {seen[stem]} and {path} would both train in "
                f"{out / 'runs' / stem}; give each config once, under its own name"
            )
        seen[stem] = path
    runs = []
    for seed in seeds:
        for path in configs:
            stem = config_name(path)
            run_dir = out / "runs" / stem / f"seed{seed}"
            own = [f"train.seed={seed}", f"run.dir={json.dumps(str(run_dir))}"]
            if not load_config(path, overrides).run.name:
                own.append(f"run.name={json.dumps(stem)}")
            load_config(path, overrides + own)
            runs.append((path, seed, run_dir, overrides + own))
    return runs


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = make_parser("launch/sweep.py", __doc__)
    add_configs(parser, many=True)
    parser.add_argument("--seeds", nargs="*", metavar="S", help="train.seed of each run")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (data parallel)")
    parser.add_argument("--output", default="sweep_out", help="runs and report go here")
    args = parser.parse_intermixed_args(argv)
    # --seeds takes every value up to the next option, so overrides written after it land there
    items = args.items + [v for v in args.seeds or [] if "=" in v]
    seeds = parse_seeds([v for v in args.seeds or [] if "=" not in v])
    configs = args.configs + [item for item in items if "=" not in item]
    if not configs:
        raise UserError(
            "give at least one config, e.g. launch/sweep.py configs/demo/crown.yaml --seeds 1 2 3"
        )
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: give at least 1 process per run")
    out = Path(args.output).resolve()
    runs = plan_runs(configs, seeds, [item for item in items if "=" in item], out)
    failed, progress = [], Progress(len(runs))
    for path, seed, run_dir, overrides in runs:
        progress.start(f"{path} seed {seed} -> {run_dir}")
        try:
            pretrain(Path(path), overrides, args.nproc)
        except UserError:
            failed.append(f"{path} seed {seed} ({run_dir}, its error is above)")
            continue
        if not (run_dir / "summary.json").is_file():
            failed.append(f"{path} seed {seed} ({run_dir}, stopped before train.max_steps)")
    done = [run_dir for _, _, run_dir, _ in runs if (run_dir / "summary.json").is_file()]
    report = write_report(done, out / "report") if done else None
    if failed:
        where = f"; the report {report} covers the other {len(done)}" if report else ""
        raise UserError(
            f"{len(failed)} of {len(runs)} runs failed: {'; '.join(failed)}{where}; "
            "fix the cause and run the same command again to finish them"
        )
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

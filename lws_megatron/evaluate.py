"""`python -m lws_megatron.evaluate DIR --tasks a,b`: lm-eval-harness benchmarks on a run's export.

DIR is a run dir (its newest checkpoint, or --step, exported to a temporary dir) or an export
dir. lm-eval's `HFLM` runs the model as this package loads it (`hf/loading.py`: our own code,
never the folder's unless --trust-remote-code), fp32; `--include-path` adds a
folder of task YAMLs (local tasks). The hub and datasets are offline, so tasks must find their
data locally (a task whose data is not cached fails in one line). The scores are written to
DIR/lm_eval.json (or --output): {"step", "tasks": {task: {metric: value}}, "settings"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lws_megatron.cli import HelpFormatter
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import write_json_atomic

RESULTS = "lm_eval.json"


def _task_manager(manager_class, tasks: list[str], include_path: Path | None):
    """lm-eval's task registry with the user's task folder; every task named must be in it."""
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"--include-path {include_path} is not a folder of task YAMLs")
    manager = manager_class(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"--tasks: lm-eval knows no task {', '.join(unknown)}; list them with "
            "`lm-eval ls tasks`, or add their YAML folder with --include-path"
        )
    return manager


def evaluate(
    path: Path,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    step: int | None = None,
    output: Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's `tasks` on the model of `path`; write and return the scores."""
    if not tasks:
        raise UserError("--tasks names no task; give comma-separated lm-eval task names")
    from lws_megatron.hf.loading import export_dir, go_offline, load

    go_offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, tasks, include_path)
    with export_dir(path, step) as model_dir:
        model, tokenizer = load(model_dir, trust_remote_code)
        lm = HFLM(
            pretrained=model.to(device),
            tokenizer=tokenizer,
            backend="causal",
            batch_size=batch_size,
            device=device,
        )
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=False,
            )
        except (FileNotFoundError, ConnectionError) as err:
            raise UserError(
                f"lm-eval could not load the data of {', '.join(tasks)} offline "
                f"({str(err).splitlines()[0][:200]}); cache it first or use a "
                "local task (--include-path)"
            ) from None
        export_step = _export_step(model_dir)
    record = _record(results, export_step, num_fewshot, limit, lm_eval.__version__)
    write_json_atomic(output or path / RESULTS, record)
    return record


def _record(
    results: dict, step: int | None, num_fewshot: int | None, limit: int | None, version: str
) -> dict[str, Any]:
    """What lm_eval.json holds: the numeric metrics per task, the step, the settings."""
    scores = {
        task: {
            metric: value for metric, value in metrics.items() if isinstance(value, (int, float))
        }
        for task, metrics in results["results"].items()
    }
    settings = {"num_fewshot": num_fewshot, "limit": limit, "lm_eval_version": version}
    return {"step": step, "tasks": scores, "settings": settings}


def _export_step(model_dir: Path) -> int | None:
    info = model_dir / "lws_export.json"
    return json.loads(info.read_text()).get("step") if info.is_file() else None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lws_megatron.evaluate",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("path", type=Path, help="a run dir or an export dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", type=Path, help="a folder of extra task YAMLs")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step", type=int, help="a run dir's checkpoint (default: newest)")
    parser.add_argument("--output", type=Path, help=f"scores JSON (default: DIR/{RESULTS})")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run an export folder's own modeling code instead of this package's",
    )
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError(
            f"--tasks {args.tasks!r} names no task; give comma-separated lm-eval task "
            "names, e.g. --tasks arc_easy,hellaswag"
        )
    record = evaluate(
        args.path,
        tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        step=args.step,
        output=args.output,
        trust_remote_code=args.trust_remote_code,
    )
    for task, metrics in record["tasks"].items():
        print(task, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

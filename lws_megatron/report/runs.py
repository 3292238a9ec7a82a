"""Reading run directories for the report: their records checked, seeds of one experiment
grouped into a profile."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lws_megatron.config import Config, load_config
from lws_megatron.errors import UserError

TRAIN_KEYS = ("step", "tokens", "loss", "tokens_per_s", "mfu", "time_s")

EVAL_KEYS = ("step", "tokens", "val_loss", "val_ppl", "time_s")

INFO_KEYS = (
    "total_params",
    "flops_per_token",
    "tokenizer_sha256",
    "valid_data_sha256",
    "tp",
    "world_size",
    "device",
)


@dataclass(frozen=True)
class Run:
    """One run directory, read and checked; `train`/`evals` hold one record per step."""

    name: str
    path: Path
    config: Config
    info: dict[str, Any]
    train: tuple[dict[str, Any], ...]
    evals: tuple[dict[str, Any], ...]
    wall_time_s: float
    finished: bool


@dataclass(frozen=True)
class Profile:
    """The runs of one experiment that differ only in `train.seed`; a run without repeats is a
    profile of one. One row in the table, one colour in the figures."""

    name: str
    runs: tuple[Run, ...]

    @property
    def seeded(self) -> bool:
        return len(self.runs) > 1

    def label(self, run: Run) -> str:
        """One run of the profile, as a sentence names it."""
        return f"{self.name} seed {run.config.train.seed}" if self.seeded else self.name


def read_metrics(path: Path) -> tuple[list[dict], list[dict], float]:
    """Training and evaluation records by ascending step, and the last logged time_s.

    A resumed run appends; a step logged twice keeps its last record of each kind.
    """
    if not path.is_file():
        raise UserError(f"{path}: not found; is {path.parent} a training run directory?")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    last_time = None
    for lineno, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        record = _parse_record(text, f"{path}:{lineno}")
        (evals if "val_loss" in record else train)[record["step"]] = record
        last_time = record["time_s"]
    if not train:
        raise UserError(f"{path}: no training records yet; the run has logged nothing to report")
    return ([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], last_time)


def _parse_record(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}); fix or delete the line") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind, keys = ("evaluation", EVAL_KEYS) if "val_loss" in record else ("training", TRAIN_KEYS)
    missing = [k for k in keys if k not in record]
    if missing:
        raise UserError(f"{where}: {kind} record lacks {', '.join(missing)}")
    bad = [
        f"{k}={record[k]!r}"
        for k in keys
        if isinstance(record[k], bool) or not isinstance(record[k], (int, float))
    ]
    if bad:
        raise UserError(f"{where}: {', '.join(bad)} should be numbers")
    return record


def read_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: not found; is {path.parent} a training run directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}")
    return data


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; give training run directories")
    config = load_config(path / "config.yaml")
    info = read_json(path / "run_info.json", INFO_KEYS)
    train, evals, wall = read_metrics(path / "metrics.jsonl")
    return Run(
        name=config.run.name or path.resolve().name,
        path=path,
        config=config,
        info=info,
        train=tuple(train),
        evals=tuple(evals),
        wall_time_s=wall,
        finished=(path / "summary.json").is_file(),
    )


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    resolved = [Path(d).resolve() for d in run_dirs]
    repeated = sorted({str(d) for d, r in zip(run_dirs, resolved) if resolved.count(r) > 1})
    if repeated:
        raise UserError(f"run directory given twice: {', '.join(repeated)}; give each once")
    return [load_run(d) for d in run_dirs]


def _experiment(config: Config) -> str:
    """The config without where the run lives, how it checkpoints and its seed: runs that
    agree on it differ only by chance."""
    tree = config.to_dict()
    del tree["run"], tree["checkpoint"], tree["train"]["seed"]
    return json.dumps(tree, sort_keys=True)


def group_runs(runs: list[Run]) -> list[Profile]:
    """Profiles in the order of their first run. Runs of one name and experiment with distinct
    seeds are one profile; any other runs sharing a name are told apart by their directory."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.name, _experiment(run.config)), []).append(run)
    members: list[list[Run]] = []
    for group in groups.values():
        seeds = [r.config.train.seed for r in group]
        members += [group] if len(set(seeds)) == len(seeds) else [[r] for r in group]
    names = [group[0].name for group in members]
    profiles = []
    for group in members:
        name = group[0].name
        if names.count(name) > 1:
            name += f" ({os.path.commonpath([str(r.path) for r in group])})"
        profiles.append(Profile(name, tuple(sorted(group, key=lambda r: r.config.train.seed))))
    return profiles

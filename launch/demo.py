"""The whole method on the built-in demo: corpus, tokenizer, index, five runs, report.

    python launch/demo.py                 # 72 steps a run (6.4 minutes measured on 2 CPU cores)
    python launch/demo.py --quick         # 24 steps a run
    python launch/demo.py my/a.yaml my/b.yaml --input my/*.jsonl --output out [key=value ...]

Everything is built offline: the default corpus is Python's own documentation. Each config
trains with `torchrun --nproc_per_node N launch/pretrain.py` (data parallel on CPU), then
`lws_megatron.report` compares the runs in OUTPUT/report/report.md, and the run with the lowest
validation loss is exported for Hugging Face to OUTPUT/export/NAME and continues a prompt.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lws_megatron.cli import Progress, add_configs
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import load_config
from lws_megatron.errors import UserError, cli_entry

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = [
    ROOT / "configs" / "demo" / f"{name}.yaml"
    for name in ("baseline", "vanilla", "framed", "reverse", "crown")
]
PROMPT = "The Python"
QUICK = ["train.max_steps=24", "eval.interval=8", "eval.batches=4", "checkpoint.interval=0"]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise UserError(f"step failed with exit status {result.returncode}: {' '.join(cmd)}")


def pretrain(config: Path, overrides: list[str], nproc: int) -> None:
    """Train one config with NPROC data-parallel processes, which share the CPU's cores."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "launch" / "pretrain.py"),
            "--config",
            str(config),
            *overrides,
        ],
        env=env,
    )


def prepare_data(inputs: list[str], out: Path, vocab_size: int) -> tuple[str, str]:
    """Tokenizer and indexed dataset under OUT/data; returns (dataset prefix, tokenizer path)."""
    py = sys.executable
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    _run(
        [
            py,
            "-m",
            "data_prep.tokenizer",
            "train",
            "--input",
            *inputs,
            "--vocab-size",
            str(vocab_size),
            "--output",
            str(data / "tokenizer"),
            "--overwrite",
        ]
    )
    _run(
        [
            py,
            "-m",
            "data_prep.preprocess",
            "--input",
            *inputs,
            "--tokenizer",
            str(data / "tokenizer.model"),
            "--output-prefix",
            str(data / "demo"),
            "--append-eod",
            "--valid-fraction",
            "0.05",
            "--overwrite",
            "--quiet",
        ]
    )
    return str(data / "demo"), str(data / "tokenizer.model")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("launch/demo.py", __doc__)
    add_configs(parser, many=True)
    parser.add_argument("--quick", action="store_true", help="24 steps per run instead of 72")
    parser.add_argument("--output", default="demo_out", help="everything goes here")
    parser.add_argument("--input", nargs="+", help="your own corpus (jsonl, jsonl.gz, txt)")
    parser.add_argument(
        "--configs",
        nargs="+",
        dest="config_list",
        default=[],
        metavar="CONFIG",
        help="your own configs (default: configs/demo)",
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (data parallel)")
    return run(parser.parse_intermixed_args(argv))


@cli_entry
def run(args: argparse.Namespace) -> int:
    started = time.time()
    out = Path(args.output).resolve()
    given = args.configs + args.config_list + [i for i in args.items if "=" not in i]
    configs = [Path(c) for c in given] or DEMO_CONFIGS
    overrides = (QUICK if args.quick else []) + [i for i in args.items if "=" in i]
    loaded = [load_config(c, overrides) for c in configs]
    vocab = {c.model.vocab_size for c in loaded}
    if len(vocab) != 1:
        raise UserError(
            f"the configs ask for different vocabularies {sorted(vocab)}; one "
            "tokenizer serves them all, so give them one model.vocab_size"
        )
    if args.input:
        inputs = sorted({p for pattern in args.input for p in glob.glob(pattern)})
        if not inputs:
            raise UserError(f"--input {' '.join(args.input)} matches no file")
    else:
        _run([sys.executable, "-m", "data_prep.demo_corpus", "--output", str(out / "corpus")])
        inputs = sorted(str(p) for p in (out / "corpus").glob("*.jsonl"))
    prefix, tokenizer = prepare_data(inputs, out, vocab.pop())

    run_dirs, progress = [], Progress(len(configs))
    for path in configs:
        run_dir = out / "runs" / path.stem
        progress.start(f"{path.stem}: {path}")
        shutil.rmtree(run_dir, ignore_errors=True)
        pretrain(
            path,
            [
                *overrides,
                f"run.dir={run_dir}",
                f"data.path=[{prefix}]",
                f"data.tokenizer={tokenizer}",
            ],
            args.nproc,
        )
        run_dirs.append(run_dir)

    from lws_megatron.report import write_report

    report = write_report(run_dirs, out / "report")
    export_best(run_dirs, out / "export")
    print(f"\nreport: {report}  ({(time.time() - started) / 60:.1f} minutes in all)")
    return 0


def export_best(run_dirs: list[Path], out: Path) -> None:
    """Export the run with the lowest final validation loss; print a sample of its text."""
    from lws_megatron.report.runs import load_runs
    from lws_megatron.report.stats import run_stats

    if importlib.util.find_spec("transformers") is None:
        print("skipping the export: install the hf extra (pip install -e '.[hf]')")
        return
    scored = [(run_stats(r).final_val_loss, r.path) for r in load_runs(run_dirs) if r.evals]
    if not scored:
        return
    best = min(scored)[1]
    target = out / best.name
    shutil.rmtree(target, ignore_errors=True)
    _run([sys.executable, "-m", "lws_megatron.export", str(best), "--output", str(target)])
    _run(
        [
            sys.executable,
            "-m",
            "lws_megatron.generate",
            str(target),
            "--prompt",
            PROMPT,
            "--max-tokens",
            "48",
            "--seed",
            "0",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())

"""How long a restart takes to reach its first step, over a small and a large corpus:
`python launch/bench_restart.py [--sizes-mb 20 2048] [--repeats 3] [--nproc 2]`.

For each size a synthetic corpus (random ids of a 512-token tokenizer, documents of about 2,048
tokens) is imported with data_prep.import_tokens into a temporary directory; a run of the tiny
test model trains 2 steps on it and checkpoints (its first start, which checks the corpus in
full and leaves the stamp of `lws_megatron/training/data_verify.py`); then the same run is
started again `--repeats` times, the sizes taken in turn, each time from process start to its
first step line, and stopped with SIGTERM (it checkpoints and exits 0). A restart whose time
grew with the corpus would be re-reading it: the printed ratio of the medians says. Last, one
token of the large corpus is changed in place, with the file's size and modification time put
back, and the run started again: it must be refused. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
DOC_TOKENS = 2048
STEP_LINE = re.compile(r"^step +\d+/\d+ \|")


def make_tokenizer(root: Path) -> Path:
    from data_prep import demo_corpus, tokenizer

    demo_corpus.main(["--output", str(root / "corpus")])
    texts = sorted(str(p) for p in (root / "corpus").glob("*.jsonl"))
    tokenizer.main(
        ["train", "--input", *texts, "--vocab-size", "512", "--output", str(root / "tok")]
    )
    return root / "tok.model"


def make_corpus(root: Path, size_mb: int, tokenizer: Path) -> str:
    """A dataset of `size_mb` MB of uint16 ids; returns its prefix."""
    from lws_megatron.dataset.tokenizer import load_tokenizer

    eod = load_tokenizer(str(tokenizer)).eod
    raw, prefix = root / f"tokens_{size_mb}mb.u16", root / f"corpus_{size_mb}mb"
    rng, left = np.random.default_rng(size_mb), size_mb * 2**20 // 2
    with open(raw, "wb") as out:
        while left:
            n = min(left, 1 << 24)
            ids = rng.integers(eod + 1, 512, n, dtype=np.uint16)
            ids[DOC_TOKENS - 1 :: DOC_TOKENS] = eod
            out.write(ids.tobytes())
            left -= n
    argv = ["--input", str(raw), "--dtype", "uint16", "--tokenizer", str(tokenizer)]
    argv += ["--output-prefix", str(prefix), "--valid-fraction", "0.002"]
    with open(os.devnull, "w") as quiet:
        code = subprocess.call(
            [sys.executable, "-m", "data_prep.import_tokens", *argv], stdout=quiet
        )
    raw.unlink()
    if code:
        sys.exit(f"data_prep.import_tokens failed for {size_mb} MB (exit {code})")
    return str(prefix)


def command(nproc: int, run_dir: Path, prefix: str, tokenizer: Path, max_steps: int) -> list[str]:
    launcher = [str(ROOT / "launch" / "torchrun.py"), "--standalone", f"--nproc_per_node={nproc}"]
    return [
        sys.executable,
        *(launcher if nproc > 1 else []),
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(TINY),
        f"run.dir={run_dir}",
        f"data.path=[{prefix}]",
        f"data.tokenizer={tokenizer}",
        f"train.max_steps={max_steps}",
        "train.log_interval=1",
        "eval.interval=0",
        "data.num_workers=1",
    ]


def first_step(argv: list[str], stop: bool) -> tuple[float, int, str]:
    """(seconds from start to the first step line, exit status, the output); `stop`: SIGTERM
    the run at that line (it checkpoints and exits 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began, took, lines = time.perf_counter(), None, []
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    for line in proc.stdout:
        lines.append(line)
        if took is None and STEP_LINE.match(line):
            took = time.perf_counter() - began
            if stop:
                proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    if took is None and code != 2:
        sys.exit(f"no step line (exit {code}):\n{''.join(lines)[-3000:]}")
    return (took if took is not None else time.perf_counter() - began), code, "".join(lines)


def edit_one_token(prefix: str) -> None:
    """One id changed in place; the file's size and modification time as they were."""
    path = prefix + "_train.bin"
    before = os.stat(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    middle = len(tokens) // 2
    tokens[middle] = 3 if tokens[middle] != 3 else 4
    tokens.flush()
    del tokens
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[20, 2048], metavar="MB")
    parser.add_argument("--repeats", type=int, default=3, help="restarts per size")
    parser.add_argument("--nproc", type=int, default=2, help="training processes per run")
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_restart_") as tmp:
        root = Path(tmp)
        tokenizer = make_tokenizer(root)
        runs = {}
        for size in args.sizes_mb:
            began = time.perf_counter()
            prefix = make_corpus(root, size, tokenizer)
            print(f"{size} MB corpus imported in {time.perf_counter() - began:.1f} s", flush=True)
            run_dir = root / f"run_{size}mb"
            argv = command(args.nproc, run_dir, prefix, tokenizer, 2)
            first, code, out = first_step(argv, stop=False)
            if code:
                sys.exit(f"first start over {size} MB failed (exit {code}):\n{out[-3000:]}")
            runs[size] = ((prefix, run_dir), first)
        report(args, runs, tokenizer)
    return 0


def report(args, runs: dict, tokenizer: Path) -> None:
    times: dict[int, list[float]] = {size: [] for size in runs}
    for repeat in range(args.repeats):
        for size in runs if repeat % 2 == 0 else reversed(list(runs)):
            (prefix, run_dir), _ = runs[size]
            argv = command(args.nproc, run_dir, prefix, tokenizer, 10**6)
            took, code, out = first_step(argv, stop=True)
            if code:
                sys.exit(f"restart over {size} MB failed (exit {code}):\n{out[-3000:]}")
            times[size].append(took)
    small, large = args.sizes_mb
    print(f"{'corpus':>9} | first start (checks it) | restarts to first step, s | median")
    for size, ((prefix, _), first) in runs.items():
        each = " ".join(f"{t:.1f}" for t in times[size])
        print(
            f"{size:>6} MB | {first:>21.1f} s | {each:>25} | {statistics.median(times[size]):.1f}"
        )
    ratio = statistics.median(times[large]) / statistics.median(times[small])
    print(f"restart over {large} MB / over {small} MB, medians: {ratio:.2f}x (target <= 1.2x)")
    (prefix, run_dir), _ = runs[large]
    edit_one_token(prefix)
    took, code, out = first_step(command(args.nproc, run_dir, prefix, tokenizer, 10**6), True)
    refused = [line for line in out.splitlines() if line.startswith("error:")]
    print(
        f"one token of the {large} MB .bin edited, size and mtime kept: exit {code} in {took:.1f} s"
    )
    print(refused[0] if refused else "NOT REFUSED")


if __name__ == "__main__":
    sys.exit(main())

"""Measure preprocess end to end against the tokenizer's raw batch encoding of the same documents.

    python -m data_prep.bench [--input FILES] [--tokenizer MODEL] [--format sentencepiece|hf]
        [--workers N] [--size-mb 32] [--repeat 3] [--megatron-lm DIR [--megatron-python PY]]

Without --input it builds the demo corpus, repeated to --size-mb, and without --tokenizer it
trains a 16,000-entry tokenizer of --format on it, all in a temporary directory. The raw rate is
the library's batch encoding of documents already in memory: for sentencepiece
`SentencePieceProcessor.encode(documents, num_threads=N)` with its default list-of-ids output
and, for reference, its numpy output; for a tokenizer.json `Tokenizer.encode_batch_fast`. The
end-to-end rate is `preprocess` reading, parsing, hashing, encoding and writing the same files
with N workers. Each is timed --repeat times, interleaved, and the best run counts. The target
is a ratio of at least 0.85.

With --megatron-lm (a Megatron-LM checkout whose tools/preprocess_data.py matches the installed
megatron-core) and a tokenizer.json, it also runs that script with its HuggingFaceTokenizer and
`python -m data_prep.preprocess` as commands on the same single input file with the same
--workers and --append-eod, compares their wall times (interpreter start and imports included
for both) and checks that the two token files are byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from data_prep.demo_corpus import build_demo_corpus
from data_prep.preprocess import default_workers, preprocess
from data_prep.readers import InputStats, ReaderOptions, expand_inputs, read_documents
from data_prep.tokenizer import FORMATS, train_tokenizer
from lws_megatron.cli import HelpFormatter
from lws_megatron.dataset.tokenizer import HUGGING_FACE, Tokenizer, load_tokenizer
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import write_json_atomic

TARGET_RATIO = 0.85
BENCH_VOCAB = 16000
MEGATRON_SCRIPT = os.path.join("tools", "preprocess_data.py")


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds (all threads) of one run."""

    wall: float
    cpu: float


def _timed(run: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def _line(label: str, timing: Timing, text_bytes: int, documents: int, tokens: int) -> str:
    return (
        f"{label:<38} {timing.wall:6.2f} s ({timing.cpu:6.2f} s CPU)  "
        f"{text_bytes / timing.wall / 1e6:6.2f} MB/s  {documents / timing.wall:8,.0f} docs/s  "
        f"{tokens / timing.wall:10,.0f} tok/s"
    )


def _demo_inputs(workdir: str, size_mb: float) -> tuple[list[str], str]:
    """The demo corpus repeated to about `size_mb`, and the corpus itself (to train a
    tokenizer on)."""
    demo = build_demo_corpus(os.path.join(workdir, "demo"))
    with open(demo, "rb") as f:
        text = f.read()
    path = os.path.join(workdir, "bench.jsonl")
    with open(path, "wb") as f:
        for _ in range(max(1, round(size_mb * 2**20 / len(text)))):
            f.write(text)
    return [path], demo


def run_bench(
    inputs: Sequence[str] | None,
    tokenizer_path: str | None,
    workers: int,
    size_mb: float,
    repeat: int,
    *,
    fmt: str = "sentencepiece",
    megatron_lm: str | None = None,
    megatron_python: str | None = None,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as workdir:
        paths, training = (
            (expand_inputs(inputs), inputs[0]) if inputs else _demo_inputs(workdir, size_mb)
        )
        if tokenizer_path is None:
            tokenizer_path = train_tokenizer(
                [training], BENCH_VOCAB, os.path.join(workdir, "tok"), fmt=fmt
            ).path
        tokenizer = load_tokenizer(tokenizer_path)
        if megatron_lm is not None:
            _check_megatron_run(megatron_lm, tokenizer, paths)
        docs = [
            doc.decode("utf-8")
            for path in paths
            for doc in read_documents(path, ReaderOptions(), InputStats(path))
        ]
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        tokens = sum(map(len, tokenizer.encode(docs, num_threads=workers)))
        out = os.path.join(workdir, "out", "bench")
        runs = _runs(tokenizer, docs, paths, out, workers)
        best = _best_of(runs, repeat)
        input_bytes = sum(os.path.getsize(p) for p in paths)
        print(
            f"input: {len(paths)} file(s), {input_bytes / 1e6:.1f} MB on disk, "
            f"{text_bytes / 1e6:.1f} MB "
            f"of text, {len(docs):,} documents, {tokens:,} tokens"
        )
        print(
            f"tokenizer: {tokenizer.path} (vocabulary {tokenizer.vocab_size}); workers: {workers}; "
            f"best of {repeat}"
        )
        labels = _labels(tokenizer, workers)
        for name in runs:
            print(_line(labels[name], best[name], text_bytes, len(docs), tokens))
        figures = _ratios(best)
        if megatron_lm is not None:
            figures.update(
                _against_megatron(
                    megatron_lm,
                    megatron_python or sys.executable,
                    tokenizer,
                    paths[0],
                    workers,
                    repeat,
                    workdir,
                    text_bytes,
                )
            )
        return figures


def _runs(
    tokenizer: Tokenizer, docs: list[str], paths: Sequence[str], out: str, workers: int
) -> dict[str, Callable[[], object]]:
    """What is timed: the tokenizer alone (lists, and numpy arrays where it has them) and
    preprocess end to end on the same inputs."""

    def end_to_end() -> None:
        preprocess(
            paths,
            tokenizer.path,
            out,
            workers=workers,
            valid_fraction=0.01,
            overwrite=True,
            progress=False,
        )

    runs: dict[str, Callable[[], object]] = {
        "raw": lambda: tokenizer.encode(docs, num_threads=workers),
        "raw_numpy": lambda: tokenizer.processor.encode(
            docs, num_threads=workers, out_type="numpy"
        ),
        "end_to_end": end_to_end,
    }
    if tokenizer.kind == HUGGING_FACE:
        del runs["raw_numpy"]
    return runs


def _best_of(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, Timing]:
    """Each run `repeat` times, interleaved so that a noisy moment hits all alike; the fastest."""
    timings: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            timings[name].append(_timed(run))
    return {name: min(values, key=lambda t: t.wall) for name, values in timings.items()}


def _labels(tokenizer: Tokenizer, workers: int) -> dict[str, str]:
    hf = tokenizer.kind == HUGGING_FACE
    return {
        "raw": (
            "raw encode_batch_fast(docs)" if hf else f"raw encode(docs, num_threads={workers})"
        ),
        "raw_numpy": "raw encode(..., out_type='numpy')",
        "end_to_end": "preprocess end to end",
    }


def _ratios(best: dict[str, Timing]) -> dict[str, float]:
    """End to end against the raw tokenizer (the target), printed and returned with the times."""
    ratio = best["raw"].wall / best["end_to_end"].wall
    cpu_ratio = best["raw"].cpu / best["end_to_end"].cpu
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    figures = {"ratio": ratio, "cpu_ratio": cpu_ratio}
    numpy_note = ""
    if "raw_numpy" in best:
        figures["ratio_numpy"] = best["raw_numpy"].wall / best["end_to_end"].wall
        numpy_note = f"against the numpy output: {figures['ratio_numpy']:.2f}; "
    print(
        f"ratio end-to-end / raw: {ratio:.2f} ({verdict} the {TARGET_RATIO} target); "
        f"{numpy_note}in CPU time: {cpu_ratio:.2f}"
    )
    figures.update({f"{name}_s": t.wall for name, t in best.items()})
    return figures


def _check_megatron_run(megatron_lm: str, tokenizer: Tokenizer, paths: Sequence[str]) -> None:
    script = os.path.join(megatron_lm, MEGATRON_SCRIPT)
    if not os.path.isfile(script):
        raise UserError(
            f"--megatron-lm {megatron_lm} has no {MEGATRON_SCRIPT}; pass a Megatron-LM "
            "checkout (its tools/ and megatron/training/ are enough)"
        )
    if tokenizer.kind != HUGGING_FACE or tokenizer.eod is None:
        raise UserError(
            f"--megatron-lm compares HuggingFaceTokenizer runs: pass a tokenizer.json "
            f"with an end-of-document token, not {tokenizer.path}"
        )
    if len(paths) != 1:
        raise UserError(
            f"--megatron-lm needs one input file (Megatron's script takes one), not {len(paths)}"
        )


def _against_megatron(
    megatron_lm: str,
    python: str,
    tokenizer: Tokenizer,
    path: str,
    workers: int,
    repeat: int,
    workdir: str,
    text_bytes: int,
) -> dict[str, float]:
    """Both tools as the commands a user runs, interleaved; best wall time of each."""
    ours_prefix, theirs_prefix = os.path.join(workdir, "ours"), os.path.join(workdir, "megatron")
    commands = {
        "ours": [python, "-m", "data_prep.preprocess", "--input", path]
        + ["--tokenizer", tokenizer.path, "--output-prefix", ours_prefix]
        + ["--workers", str(workers), "--append-eod", "--overwrite", "--quiet"],
        "megatron": [python, os.path.join(megatron_lm, MEGATRON_SCRIPT), "--input", path]
        + ["--output-prefix", theirs_prefix, "--tokenizer-type", "HuggingFaceTokenizer"]
        + ["--tokenizer-model", _megatron_tokenizer(tokenizer, workdir)]
        + ["--workers", str(workers), "--append-eod", "--log-interval", str(10**9)],
    }
    best = _best_command_walls(commands, megatron_lm, repeat)
    same = filecmp.cmp(
        ours_prefix + "_train.bin", theirs_prefix + "_text_document.bin", shallow=False
    )
    for name, label in (
        ("megatron", "Megatron-LM tools/preprocess_data.py"),
        ("ours", "python -m data_prep.preprocess"),
    ):
        print(
            f"{label:<38} {best[name]:6.2f} s  {text_bytes / best[name] / 1e6:6.2f} MB/s  "
            f"(command, {workers} worker(s), best of {repeat})"
        )
    ratio = best["megatron"] / best["ours"]
    print(
        f"speed-up over Megatron-LM: {ratio:.2f}x ({'meets' if ratio >= 1 else 'MISSES'} the 1.0 "
        f"target); token files identical: {'yes' if same else 'NO'}"
    )
    return {
        "megatron_s": best["megatron"],
        "ours_command_s": best["ours"],
        "megatron_ratio": ratio,
        "megatron_identical": float(same),
    }


def _megatron_tokenizer(tokenizer: Tokenizer, workdir: str) -> str:
    """The tokenizer.json as the folder Megatron's HuggingFaceTokenizer loads, its eos named."""
    model_dir = os.path.join(workdir, "hf_tokenizer")
    os.makedirs(model_dir)
    shutil.copyfile(tokenizer.path, os.path.join(model_dir, "tokenizer.json"))
    eod_token = tokenizer.processor.id_to_token(tokenizer.eod)
    write_json_atomic(
        os.path.join(model_dir, "tokenizer_config.json"),
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token},
    )
    return model_dir


def _best_command_walls(
    commands: dict[str, list[str]], megatron_lm: str, repeat: int
) -> dict[str, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (os.path.abspath(megatron_lm), os.environ.get("PYTHONPATH")) if p
        ),
    }
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            walls[name].append(time.perf_counter() - start)
            if done.returncode:
                raise UserError(
                    f"{' '.join(command)} failed (exit {done.returncode}): "
                    f"{done.stderr.strip().splitlines()[-1:] or ''}"
                )
    return {name: min(values) for name, values in walls.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.bench",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--input", nargs="+", metavar="FILE", help="jsonl/txt files (default: demo corpus)"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="sentencepiece .model or tokenizer.json (default: train one)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="sentencepiece",
        help="the kind of tokenizer to train without --tokenizer",
    )
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N")
    parser.add_argument("--size-mb", type=float, default=32.0, help="size of the generated corpus")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--json", action="store_true", help="also print the figures as one JSON line"
    )
    parser.add_argument(
        "--megatron-lm",
        metavar="DIR",
        help="also time this Megatron-LM checkout's tools/preprocess_data.py",
    )
    parser.add_argument(
        "--megatron-python",
        metavar="PY",
        help="interpreter for both commands (default: this one); Megatron's script "
        "needs transformers and its megatron-core imports",
    )
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    figures = run_bench(
        args.input,
        args.tokenizer,
        args.workers,
        args.size_mb,
        max(1, args.repeat),
        fmt=args.format,
        megatron_lm=args.megatron_lm,
        megatron_python=args.megatron_python,
    )
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

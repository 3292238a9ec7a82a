"""Measure preprocess end to end against sentencepiece's raw batch encoding of the same documents.

    python -m data_prep.bench [--input FILES] [--tokenizer MODEL] [--workers N]
        [--size-mb 32] [--repeat 3]

Without --input it builds the demo corpus, repeated to --size-mb, and without --tokenizer it
trains a 16,000-piece BPE model on it, all in a temporary directory. The raw rate is
`SentencePieceProcessor.encode(documents, num_threads=N)` on documents already in memory, the
API's default list-of-ids output and, for reference, its numpy output; the end-to-end rate is
`preprocess` reading, parsing, hashing, encoding and writing the same files with N workers.
Each is timed --repeat times, interleaved, and the best run counts. The target is a ratio of
at least 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from data_prep.demo_corpus import build_demo_corpus
from data_prep.preprocess import default_workers, preprocess
from data_prep.readers import InputStats, ReaderOptions, expand_inputs, read_documents
from data_prep.tokenizer import load_tokenizer, train_tokenizer
from lws_megatron.errors import cli_entry

TARGET_RATIO = 0.85
BENCH_VOCAB = 16000


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
    """The demo corpus repeated to about `size_mb`, and the corpus itself to train a tokenizer on."""
    demo = build_demo_corpus(os.path.join(workdir, "demo"))
    with open(demo, "rb") as f:
        text = f.read()
    path = os.path.join(workdir, "bench.jsonl")
    with open(path, "wb") as f:
        for _ in range(max(1, round(size_mb * 2**20 / len(text)))):
            f.write(text)
    return [path], demo


def run_bench(
    inputs: Sequence[str] | None, tokenizer_path: str | None, workers: int, size_mb: float, repeat: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as workdir:
        paths, training = (expand_inputs(inputs), inputs[0]) if inputs else _demo_inputs(workdir, size_mb)
        if tokenizer_path is None:
            tokenizer_path = train_tokenizer([training], BENCH_VOCAB, os.path.join(workdir, "tok")).path
        tokenizer = load_tokenizer(tokenizer_path)
        docs = [
            doc.decode("utf-8")
            for path in paths
            for doc in read_documents(path, ReaderOptions(), InputStats(path))
        ]
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        tokens = sum(map(len, tokenizer.processor.encode(docs, num_threads=workers)))
        out = os.path.join(workdir, "out", "bench")

        def end_to_end() -> None:
            preprocess(paths, tokenizer_path, out, workers=workers, valid_fraction=0.01,
                       overwrite=True, progress=False)

        runs: dict[str, Callable[[], object]] = {
            "raw": lambda: tokenizer.processor.encode(docs, num_threads=workers),
            "raw_numpy": lambda: tokenizer.processor.encode(docs, num_threads=workers, out_type="numpy"),
            "end_to_end": end_to_end,
        }
        timings: dict[str, list[Timing]] = {name: [] for name in runs}
        for _ in range(repeat):
            for name, run in runs.items():
                timings[name].append(_timed(run))
        best = {name: min(values, key=lambda t: t.wall) for name, values in timings.items()}
        input_bytes = sum(os.path.getsize(p) for p in paths)
        print(f"input: {len(paths)} file(s), {input_bytes / 1e6:.1f} MB on disk, {text_bytes / 1e6:.1f} MB "
              f"of text, {len(docs):,} documents, {tokens:,} tokens")
        print(f"tokenizer: {tokenizer.path} (vocabulary {tokenizer.vocab_size}); workers: {workers}; "
              f"best of {repeat}")
        labels = {
            "raw": f"raw encode(docs, num_threads={workers})",
            "raw_numpy": "raw encode(..., out_type='numpy')",
            "end_to_end": "preprocess end to end",
        }
        for name, label in labels.items():
            print(_line(label, best[name], text_bytes, len(docs), tokens))
        ratio = best["raw"].wall / best["end_to_end"].wall
        ratio_numpy = best["raw_numpy"].wall / best["end_to_end"].wall
        cpu_ratio = best["raw"].cpu / best["end_to_end"].cpu
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"ratio end-to-end / raw: {ratio:.2f} ({verdict} the {TARGET_RATIO} target); against the "
              f"numpy output: {ratio_numpy:.2f}; in CPU time: {cpu_ratio:.2f}")
        return {
            "ratio": ratio,
            "ratio_numpy": ratio_numpy,
            "cpu_ratio": cpu_ratio,
            **{f"{name}_s": t.wall for name, t in best.items()},
        }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", metavar="FILE", help="jsonl/txt files (default: demo corpus)")
    parser.add_argument("--tokenizer", metavar="MODEL", help="sentencepiece model (default: train one)")
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N")
    parser.add_argument("--size-mb", type=float, default=32.0, help="size of the generated corpus")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    figures = run_bench(args.input, args.tokenizer, args.workers, args.size_mb, max(1, args.repeat))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

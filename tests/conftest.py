"""Shared fixtures (a tiny tokenized corpus built offline with data_prep, once per session) and
the markers that fixtures imply.

Markers (registered in pyproject.toml): `slow` (a training run, a compile, a cluster: `pytest -m
"not slow"` is the quick loop), `distributed` (several real processes), `slurm` (a private
one-node SLURM cluster), `gpu` (needs CUDA), `megatron_versions` (what can differ between
the Megatron-Core versions CI tests: `make test-megatron`), `serial` (a measurement that
load beside it would blur: runs alone). `.ci/run` runs everything on the first interpreter and the
`megatron_versions` tests on the second, both at once.

`make test` runs the files on several pytest workers (pytest-xdist, a file to a worker, in the
order collected: the longest first, so that the workers end together). While a `serial` test
runs, no other test of this suite starts, on any worker or interpreter of the machine
(`_alone_when_serial`).
"""

import contextlib
import fcntl
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds ops under a file lock in $TORCH_EXTENSIONS_DIR (by default machine-wide,
# where another job's killed build stalls every process): the tests use one of this venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
_IMPLIED = {
    "slurm_cluster": ("slurm", "slow", "distributed"),
    "two_proc": ("distributed", "slow"),
    "single_rank": ("distributed",),
    "reference": ("distributed", "slow"),
}


# The model, the step's data parallelism, checkpoints and exports: their quick tests, and
# these slow ones (a DDP step at ZeRO 1 with and without a pipeline, a compile, a resume).
_MEGATRON_FILES = (
    "tests/model/",
    "tests/planner/test_activations.py",
    "tests/training/test_zero.py",
    "tests/training/test_checkpoint.py",
    "tests/test_export.py",
    "tests/test_export_layout.py",
    "tests/test_native_export.py",
)
_MEGATRON_SLOW = (
    "tests/training/test_overlap.py::test_overlapped_reduction_changes_no_loss[zero1]",
    "tests/training/test_overlap.py::test_overlapped_reduction_changes_no_loss[zero1-pp2-vpp2]",
    "tests/training/test_overlap.py::test_the_weight_gather_runs_behind_the_next_forward[1]",
    "tests/training/test_sync_free.py::test_a_step_reads_nothing_and_an_interval_reads_once[dp2-zero1]",
    "tests/model/test_compile.py",
    "tests/training/test_recompute_sp.py::test_sequence_parallel_and_selective_recompute_at_tp2",
)


# The files that take longest (minutes each), first: a worker that takes one late would run on
# alone at the end (`make test` keeps this order: xdist's own puts the files with most tests
# first).
_LONGEST_FIRST = (
    "tests/launch/test_gpu_measure.py",
    "tests/launch/test_faults.py",
    "tests/training/test_training.py",
    "tests/training/test_reshard.py",
    "tests/training/test_recompute_sp.py",
    "tests/launch/test_launch.py",
    "tests/training/test_olmo_training.py",
    "tests/training/test_run_safety.py",
    "tests/launch/test_demo.py",
    "tests/test_bench.py",
    "tests/launch/test_sweep.py",
    "tests/model/test_compile.py",
    "tests/test_export.py",
)
_LOCKS = Path(tempfile.gettempdir()) / "lws-megatron-tests"


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    for item in items:
        for fixture in item.fixturenames:
            for marker in _IMPLIED.get(fixture, ()):
                item.add_marker(marker)
        quick = item.get_closest_marker("slow") is None
        if (quick and item.nodeid.startswith(_MEGATRON_FILES)) or item.nodeid.startswith(
            _MEGATRON_SLOW
        ):
            item.add_marker("megatron_versions")


_kept: contextlib.ExitStack | None = None  # a serial test's turn, kept for the serial next


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The whole test, the module fixtures it sets up included, inside its turn. Serial tests
    in a row share one turn: the room is emptied once for them, not once each."""
    global _kept
    serial = _serial(item)
    turn, _kept = _kept or _alone_when_serial(serial), None
    try:
        return (yield)
    finally:
        if serial and nextitem is not None and _serial(nextitem):
            _kept = turn
        else:
            turn.close()


def _serial(item) -> bool:
    return item.get_closest_marker("serial") is not None


def _alone_when_serial(serial: bool) -> contextlib.ExitStack:
    """A readers-writer lock of two files: tests share the room, a serial test has it alone.
    Every test passes the turnstile to enter, and a serial one holds it until done, so no test
    enters after it while it waits for those inside to leave. Closing the stack leaves."""
    _LOCKS.mkdir(exist_ok=True)
    turn = contextlib.ExitStack()
    turnstile = turn.enter_context(open(_LOCKS / "turnstile", "w"))
    room = turn.enter_context(open(_LOCKS / "room", "w"))
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    fcntl.flock(room, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
    if not serial:
        fcntl.flock(turnstile, fcntl.LOCK_UN)
    return turn


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """{"prefix", "tokenizer"}: the demo corpus indexed with a 512-token tokenizer."""
    from data_prep import demo_corpus, preprocess, tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    assert demo_corpus.main(["--output", str(root / "corpus")]) == 0
    corpus = sorted(str(p) for p in (root / "corpus").glob("*.jsonl"))
    assert (
        tokenizer.main(
            ["train", "--input", *corpus, "--vocab-size", "512", "--output", str(root / "tok")]
        )
        == 0
    )
    assert (
        preprocess.main(
            [
                "--input",
                *corpus,
                "--tokenizer",
                str(root / "tok.model"),
                "--output-prefix",
                str(root / "data"),
                "--append-eod",
                "--valid-fraction",
                "0.05",
                "--quiet",
            ]
        )
        == 0
    )
    return {"prefix": str(root / "data"), "tokenizer": str(root / "tok.model")}

"""Every command line as a user meets it: `--help` at once (no torch, Megatron, DeepSpeed or
transformers imported for it; a generous time bound, the measured figures are in the README),
stdout holding only the command's own output, configs taken the same way everywhere, data_prep
tokenizing without torch or Megatron, and `| head` ending quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "lws_megatron.describe",
    "lws_megatron.plan",
    "lws_megatron.report",
    "lws_megatron.export",
    "lws_megatron.generate",
    "lws_megatron.evaluate",
    "data_prep.demo_corpus",
    "data_prep.tokenizer",
    "data_prep.preprocess",
    "data_prep.inspect",
    "data_prep.import_tokens",
    "data_prep.bench",
]
SCRIPTS = ["pretrain", "demo", "bench", "submit", "sweep", "gpu_check", "gpu_measure"]
COMMANDS = [["-m", m] for m in MODULES] + [[f"launch/{s}.py"] for s in SCRIPTS]
HEAVY = ("torch", "megatron", "deepspeed", "transformers", "lm_eval")
HELP_BOUND_S = 5.0  # generous: about 0.1-0.2 s each on an idle machine, shared machines vary
# Runs a command in this interpreter and reports which heavy packages it imported.
PROBE = """
import runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args]
try:
    if target.endswith(".py"):
        sys.path.insert(0, "launch")
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(" ".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
""".format(heavy=HEAVY)


def run(args: list[str], **options) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        **options,
    )


def heavy_imports(target: str, *args: str) -> list[str]:
    proc = run(["-c", PROBE, target, *args])
    return proc.stderr.strip().splitlines()[-1].split() if proc.stderr.strip() else []


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_help_is_quick_and_prints_only_usage(command):
    started = time.perf_counter()
    proc = run([*command, "--help"])
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and "WARNING" not in proc.stdout
    assert seconds < HELP_BOUND_S, f"{' '.join(command)} --help took {seconds:.2f} s"
    assert heavy_imports(command[-1], "--help") == []


def test_data_prep_tokenizes_without_torch_or_megatron(tiny_data, tmp_path):
    corpus = Path(tiny_data["tokenizer"]).parent / "corpus" / "pydocs.jsonl"
    args = ["--input", str(corpus), "--tokenizer", tiny_data["tokenizer"]]
    args += ["--output-prefix", str(tmp_path / "d"), "--quiet"]
    assert heavy_imports("data_prep.preprocess", *args) == []
    assert (tmp_path / "d.manifest.json").is_file()
    assert heavy_imports("data_prep.inspect", str(tmp_path / "d")) == []


def test_deepspeeds_log_stays_off_stdout():
    proc = run(
        [
            "-c",
            "import lws_megatron, deepspeed.utils; deepspeed.utils.logger.warning('x')",
        ]
    )
    assert proc.returncode == 0 and proc.stdout == ""
    assert "[WARNING] [DeepSpeed] x" in proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["launch/pretrain.py", "{config}", "--print-config"],
        ["launch/pretrain.py", "--config", "{config}", "--print-config"],
        ["launch/pretrain.py", "--print-config", "train.max_steps=7", "--config", "{config}"],
    ],
)
def test_pretrain_prints_the_resolved_config_however_it_is_given(command, tmp_path):
    config = str(ROOT / "tests" / "configs" / "tiny.yaml")
    proc = run([a.format(config=config) for a in command])
    assert proc.returncode == 0, proc.stderr
    steps = 7 if "train.max_steps=7" in command else 10
    assert f"max_steps: {steps}\n" in proc.stdout and "base:" not in proc.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "lws_megatron.describe", "--json"],
        ["-m", "lws_megatron.plan", "--pp", "2", "--json"],
    ],
)
def test_config_positional_or_option_reads_the_same(command):
    config = "configs/paper/crown-18l.yaml"
    positional = run([*command, config, "model.num_layers=12"])
    option = run([*command, "--config", config, "model.num_layers=12"])
    assert positional.returncode == option.returncode == 0, option.stderr
    assert json.loads(positional.stdout) == json.loads(option.stdout)


def test_no_config_is_one_line():
    for command in (
        ["launch/pretrain.py"],
        ["launch/sweep.py", "--seeds", "1"],
        ["launch/bench.py"],
    ):
        proc = run(command)
        assert (
            proc.returncode == 2 and proc.stderr.count("\n") == 1 and "config, e.g." in proc.stderr
        )


def test_a_reader_that_stops_early_ends_the_output_quietly():
    configs = sorted(str(p) for p in (ROOT / "configs" / "paper").glob("*.yaml")) * 20
    proc = subprocess.Popen(
        [sys.executable, "-m", "lws_megatron.describe", *configs, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout.read(10)
    proc.stdout.close()  # what `| head` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""

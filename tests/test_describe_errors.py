"""`describe` refuses a bad --tp and reports a --plot target it cannot write in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lws_megatron.describe import main

ROOT = Path(__file__).resolve().parents[1]
CROWN = str(ROOT / "configs" / "paper" / "crown-18l.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def describe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lws_megatron.describe", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


@pytest.mark.parametrize("tp", ["0", "-2"])
def test_tp_below_one_is_refused(tp):
    assert_one_line_error(
        describe(CROWN, "--tp", tp), f"--tp {tp}: the tensor-parallel size must be at least 1"
    )


def test_plot_into_missing_directories_creates_them(tmp_path, capsys):
    png = tmp_path / "new" / "deeper" / "crown.png"
    assert main([CROWN, "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in png.parent.iterdir()) == ["crown.png"]


def test_plot_under_a_regular_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory\n")
    assert_one_line_error(
        describe(CROWN, "--plot", str(blocker / "out.png")),
        f"{blocker} exists but is not a directory",
    )
    assert_one_line_error(
        describe(CROWN, "--plot", str(blocker / "sub" / "out.png")),
        f"{blocker / 'sub'}: Not a directory",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_plot_onto_a_directory_or_in_an_unknown_format_is_a_one_line_error(tmp_path):
    assert_one_line_error(describe(CROWN, "--plot", str(tmp_path)), f"{tmp_path}: Is a directory")
    assert_one_line_error(
        describe(CROWN, "--plot", str(tmp_path / "out.xyz")),
        "out.xyz: cannot write .xyz images; name a .png, .svg or .pdf file",
    )
    assert list(tmp_path.iterdir()) == []


def test_plot_into_a_read_only_directory_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: chmod 0o500 does not stop writes here")
    assert_one_line_error(
        describe(CROWN, "--plot", str(locked / "out.png")),
        f"{locked / 'out.png'}: Permission denied",
    )
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(
    "option, amount, message",
    [
        ("--match-params", "0", "amount '0' must lie between 1 and 1e30"),
        ("--match-flops", "0", "amount '0' must lie between 1 and 1e30"),
        ("--match-params", "0.4", "amount '0.4' must lie between 1 and 1e30"),
        ("--match-flops", "1e400", "amount '1e400' must lie between 1 and 1e30"),
        ("--match-params", "1..2", "amount '1..2': write a number with an optional K/M/B suffix"),
    ],
)
def test_a_budget_that_is_no_amount_is_refused(option, amount, message):
    assert_one_line_error(describe(CROWN, option, amount), f"{option}: {message}")


@pytest.mark.parametrize(
    "target, message",
    [
        (
            "{tmp}/new/",
            "{tmp}/new/: names a directory; name an image file, e.g. {tmp}/new/crown.png",
        ),
        (".", ".: names a directory"),
        ("", "--plot '' names no file"),
    ],
)
def test_plot_onto_a_directory_or_nothing_is_a_one_line_error(tmp_path, target, message):
    target, message = target.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert_one_line_error(describe(CROWN, "--plot", target), message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_plot_onto_a_filesystem_without_files_is_a_one_line_error():
    assert_one_line_error(
        describe(CROWN, "--plot", "/proc/profiles.png"),
        "/proc/profiles.png: cannot write the image there (No such file or directory)",
    )

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

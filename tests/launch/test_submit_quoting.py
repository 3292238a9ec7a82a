"""A config file's name can't inject commands into the batch script submit.py writes."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "launch" / "submit.py"
HOSTILE = "a\ntouch INJECTED\n$(touch SUBSTITUTED)b.yaml"


def submit(cwd: Path, *args: str, path: str = os.environ["PATH"]) -> subprocess.CompletedProcess:
    """submit.py on a config named HOSTILE (the tiny config) in `cwd`, run from `cwd`."""
    config = cwd / HOSTILE
    config.write_text(f"base: {ROOT / 'tests' / 'configs' / 'tiny.yaml'}\n")
    return subprocess.run(
        [
            sys.executable,
            str(SUBMIT),
            str(config),
            "--gpus-per-node",
            "1",
            "--skip-data-check",
            f"run.dir={cwd / 'run'}",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": path},
    )


def test_dry_run_of_a_config_named_with_a_newline_runs_nothing_from_the_name(tmp_path):
    proc = submit(tmp_path, "--dry-run", "--job-name", "hostile")
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOSTILE]
    assert proc.returncode == 0, proc.stderr
    assert f"# Written by launch/submit.py for {str(tmp_path / HOSTILE)!r};" in proc.stdout


def test_written_script_parses_and_its_dry_run_creates_no_file(tmp_path):
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    proc = submit(work, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    script = work / "run" / "job" / "submit.sbatch"
    assert "#SBATCH --job-name=lws-a-touch-INJECTED---touch-SUBSTITUTED-b" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert sorted(p.name for p in script.parent.iterdir()) == [
        "config.yaml",
        "logs",
        "submit.sbatch",
    ]
    dry = subprocess.run(
        ["bash", str(script)],
        cwd=work,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "LWS_DRY_RUN": "1"},
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout)[-2:] == ["--config", str(work / "run" / "job" / "config.yaml")]
    assert sorted(p.name for p in work.iterdir()) == [HOSTILE, "run"]

"""What the tests share: the repository root and the tiny model config most of them train
(`tests/configs/tiny.yaml`); real processes on gloo in `dist_utils`, export checks in
`export_utils`. Imported as `tests.helpers` (pytest's `pythonpath` is the repository root)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"

"""Tests in subfolders import the shared helpers (dist_utils) from tests/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

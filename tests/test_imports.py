"""The package layout as a reader relies on it: imports run one way between data_prep and
lws_megatron, and no module takes the name of a standard-library one."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lws_megatron", "data_prep", "launch")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_lws_megatron_never_imports_data_prep():
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / "lws_megatron").rglob("*.py"))
        for module in sorted(imported_modules(path))
        if module.split(".")[0] == "data_prep"
    ]
    assert offenders == []


def test_no_module_shadows_the_standard_library():
    """Running a file by its path puts its folder first on sys.path, where a module named like
    the standard library's (inspect, profile) would replace it for every import."""
    shadows = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*"))
        if (path.suffix == ".py" and path.stem in sys.stdlib_module_names)
        or (
            path.is_dir()
            and path.name in sys.stdlib_module_names
            and (path / "__init__.py").exists()
        )
    ]
    assert shadows == []

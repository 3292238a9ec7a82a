"""Build the demo corpus offline from the documentation every Python installation carries.

    python -m data_prep.demo_corpus --output DIR [--overwrite]

writes DIR/pydocs.jsonl ({"text": ...} per line): one document per standard-library module
(its docstring, then each documented class and function headed by its qualified name and
signature) and one per pydoc topic (`pydoc_data.topics`, the text behind `help("TOPIC")`).
Sources are parsed with `ast`, never imported, so no import side effect runs (antigravity
opening a browser, `this` printing); test suites, idlelib, tkinter and turtledemo are left
out. Files and topics are taken in sorted order, so the corpus is the same on every run of
the same Python version (about 2 MB of text with CPython 3.11).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import os
import sys
import sysconfig
import warnings
from typing import Iterator, Sequence

from data_prep.files import refuse_existing
from lws_megatron.cli import HelpFormatter
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import atomic_output, ensure_dir

CORPUS_FILE = "pydocs.jsonl"
_SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "__pycache__",
    }
)


def stdlib_sources(root: str) -> Iterator[tuple[str, str]]:
    """Yield (module name, path) for the standard library's .py files, in sorted order."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and "-" not in d)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def module_document(module: str, source: bytes) -> str | None:
    """The docstrings of one module as a document, or None when it has none or does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    sections = [f"Module {module}\n\n{doc}"] if (doc := ast.get_docstring(tree)) else []
    sections += [f"{header}\n\n{doc}" for header, doc in _definitions(tree.body, module)]
    return "\n\n".join(sections) or None


def _definitions(body: list[ast.stmt], scope: str) -> Iterator[tuple[str, str]]:
    for node in body:
        if isinstance(node, ast.ClassDef):
            name = f"{scope}.{node.name}"
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc := ast.get_docstring(node):
                yield f"class {name}({bases})", doc
            yield from _definitions(node.body, name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if doc := ast.get_docstring(node):
                yield f"def {scope}.{node.name}({ast.unparse(node.args)})", doc


def topic_documents() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield f"Topic {name}\n\n{topics[name].strip()}"


def demo_documents(stdlib: str) -> Iterator[str]:
    found = False
    for module, path in stdlib_sources(stdlib):
        found = True
        with open(path, "rb") as f:
            if doc := module_document(module, f.read()):
                yield doc
    if not found:
        raise UserError(
            f"no standard-library sources under {stdlib} (a Python installed without .py files?); "
            "use your own text files with data_prep.preprocess instead"
        )
    yield from topic_documents()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Syntax trees hold no cycles; the collector would only rescan a process's every object
    (hundreds of thousands once torch is imported) for each few thousand nodes parsed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_demo_corpus(output_dir: str, *, overwrite: bool = False) -> str:
    """Write DIR/pydocs.jsonl atomically and return its path."""
    path = os.path.join(output_dir, CORPUS_FILE)
    refuse_existing([path], overwrite, "demo corpus")
    ensure_dir(output_dir)
    with _gc_paused(), atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in demo_documents(sysconfig.get_paths()["stdlib"]):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo_corpus",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace an existing DIR/{CORPUS_FILE}"
    )
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = build_demo_corpus(args.output, overwrite=args.overwrite)
    with open(path, "rb") as f:
        documents = sum(1 for _ in f)
    print(f"wrote {path}: {documents:,} documents, {os.path.getsize(path) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

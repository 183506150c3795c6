"""The package keeps the shape design.md asks for: short functions in training/ and data/, a training
loop that fits one screen, TensorFlow imported in one place (data/tf_setup.py, which keeps it off the
GPU), and no test-only hooks in the package."""

from __future__ import annotations

import ast
from pathlib import Path

from vla_test_utils import REPO

PACKAGE = REPO / "vla_train"


def _functions(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def test_functions_in_training_and_data_are_under_100_lines():
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for folder in (PACKAGE / "training", PACKAGE / "data")
        for path, node in _functions(folder)
        if node.end_lineno - node.lineno + 1 >= 100
    ]
    assert not long, long


def test_the_training_loop_fits_one_screen():
    (loop,) = [n for _, n in _functions(PACKAGE / "training") if n.name == "_loop"]
    assert loop.end_lineno - loop.lineno + 1 <= 40


def test_tensorflow_is_imported_only_by_tf_setup():
    where = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("tensorflow", "tensorflow_datasets") for n in names):
                where.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert where == ["vla_train/data/tf_setup.py:8", "vla_train/data/tf_setup.py:9"], where


def test_no_test_hooks_in_the_package():
    hooks = [p for p in PACKAGE.rglob("*.py") if "VLA_TRAIN_TEST" in p.read_text()]
    assert not hooks, hooks

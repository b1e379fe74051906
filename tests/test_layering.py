"""Imports flow one way: mixpro_dali <- pipelines <- train <- tools; in mixpro_dali, DALI only in operator.py
(the data path) and smoke.py (the install check)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"mixpro_dali": {"pipelines", "train", "tools"}, "pipelines": {"train", "tools"},
             "train": {"tools"}, "tools": set()}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no python files"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_nothing_imports_train_and_dali_only_in_the_operator():
    for package in ("mixpro_dali", "pipelines"):
        for f in sorted((ROOT / package).rglob("*.py")):
            assert not imported_roots(f) & {"train", "tools"}, f
    lib = [f for f in (ROOT / "mixpro_dali").rglob("*.py") if "nvidia" in imported_roots(f)]
    allowed = {"operator.py", "smoke.py"}
    assert {f.name for f in lib} <= allowed, lib

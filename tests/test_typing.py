"""Typing: mypy passes on the package, the examples and the notebook; the _core stub is complete."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nplora
from nplora import _core

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "python" / "nplora" / "_core.pyi"


def _stub_names(body: list[ast.stmt]) -> set[str]:
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_package_ships_the_stub_and_py_typed():
    package = Path(nplora.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_core.pyi").is_file()


def test_stub_names_everything_the_core_has():
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    in_stub = _stub_names(tree.body)
    public = {name for name in dir(_core) if not name.startswith("_")} | {"__version__"}
    missing = sorted(public - in_stub)
    assert not missing, f"_core.pyi lacks {missing}: regenerate it (see its first line)"
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name, node in classes.items():
        members = {m for m in dir(getattr(_core, name)) if not m.startswith("_")}
        lacking = sorted(members - _stub_names(node.body))
        assert not lacking, f"_core.pyi's {name} lacks {lacking}: regenerate it"


def _notebook_as_script(path: Path, target: Path) -> Path:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    target.write_text("\n\n".join(cells) + "\n", encoding="utf-8")
    return target


def test_mypy_passes_on_package_and_examples(tmp_path):
    pytest.importorskip("mypy")
    notebook = _notebook_as_script(ROOT / "examples" / "quickstart.ipynb", tmp_path / "quickstart.py")
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", str(tmp_path / "cache"), "python/nplora", "examples", str(notebook)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

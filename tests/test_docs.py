"""Documentation: numpydoc docstrings (with shapes) on every public name, and the README's API table."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import nplora

README = Path(__file__).resolve().parent.parent / "README.md"
PUBLIC = sorted(name for name in nplora.__all__ if name != "__version__")
ARRAY_TYPES = ("ndarray", "array_like", "array-like")


def parse_sections(doc: str) -> dict[str, dict[str, str]]:
    """numpydoc sections of `doc`: {section title: {entry name: entry text}}."""
    lines = inspect.cleandoc(doc).splitlines()
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    entry = None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and line.strip():
            current = sections.setdefault(line.strip(), {})
            entry = None
            continue
        if current is None or re.fullmatch(r"-{3,}", line.strip()):
            continue
        if line and not line.startswith(" "):
            entry = line
            current[entry] = line
        elif entry is not None:
            current[entry] += "\n" + line
    return sections


def entry_names(entry: str) -> list[str]:
    """The names an entry line documents: ``a, b : int`` documents a and b."""
    head = entry.split(" : ", 1)[0]
    return [name.strip().lstrip("*") for name in head.split(",") if name.strip()]


def public_objects():
    """(qualified name, object) for every public name and every public member of public classes."""
    for name in PUBLIC:
        obj = getattr(nplora, name)
        yield name, obj
        if not inspect.isclass(obj):
            continue
        for attr in dir(obj):
            if attr.startswith("_"):
                continue
            member = inspect.getattr_static(obj, attr)
            function = member.fget if isinstance(member, property) else member
            if isinstance(function, (staticmethod, classmethod)):
                function = function.__func__
            if callable(function) and getattr(function, "__module__", "").startswith("nplora"):
                yield f"{name}.{attr}", member


def signature_parameters(obj) -> list[str]:
    """Parameters a docstring must describe (not self, *args or **kwargs)."""
    function = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and not getattr(function, "__module__", "").startswith("nplora"):
        return []  # an exception or warning class: no constructor of its own
    if isinstance(function, (staticmethod, classmethod)):
        function = function.__func__
    parameters = inspect.signature(function).parameters.values()
    return [p.name for p in parameters if p.name not in ("self", "cls")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def returns_something(obj) -> bool:
    if inspect.isclass(obj) or isinstance(obj, property):
        return False
    function = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
    annotation = inspect.signature(function).return_annotation
    return annotation not in ("None", None, inspect.Signature.empty)


CASES = dict(public_objects())


@pytest.mark.parametrize("name", sorted(CASES))
def test_public_name_has_a_numpydoc_docstring(name):
    obj = CASES[name]
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{name} has no docstring"
    assert doc.splitlines()[0].strip(), f"{name}: the docstring must open with a summary line"
    if isinstance(obj, property):
        return
    sections = parse_sections(doc)
    wanted = signature_parameters(obj)
    if wanted:
        assert "Parameters" in sections, f"{name} needs a Parameters section for {wanted}"
        documented = {n for entry in sections["Parameters"] for n in entry_names(entry)}
        missing = [p for p in wanted if p not in documented]
        assert not missing, f"{name}: Parameters does not describe {missing}"
    if returns_something(obj):
        assert "Returns" in sections or "Yields" in sections, f"{name} needs a Returns section"
    for title in ("Parameters", "Returns", "Yields", "Attributes"):
        for entry, text in sections.get(title, {}).items():
            kind = entry.split(" : ", 1)[-1] if " : " in entry else entry
            if kind.startswith(ARRAY_TYPES):
                assert "shape" in text, f"{name}: {title} entry {entry!r} must give its shape"


def readme_api_rows() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## API overview\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "README.md has no '## API overview' section"
    rows = {}
    for line in match.group(1).splitlines():
        cell = re.match(r"\|\s*`([A-Za-z_][\w.]*)[^`]*`", line)
        if cell:
            rows[cell.group(1)] = line
    return rows


def test_readme_api_table_lists_every_public_name():
    rows = readme_api_rows()
    missing = [name for name in nplora.__all__ if name not in rows]
    assert not missing, f"README's API overview lacks {missing}"
    unknown = [name for name in rows if "." not in name and name not in nplora.__all__]
    assert not unknown, f"README's API overview lists names nplora does not export: {unknown}"


@pytest.mark.parametrize("name", ["LoraLinear", "LoraEmbedding", "LoraModel", "load_adapter",
                                  "open_weights", "swap_adapters"])
def test_readme_api_rows_give_shapes(name):
    assert re.search(r"\(\S+, \S+\)|\[\S+, \S+\]", readme_api_rows()[name]), name


def test_readme_still_opens_with_its_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# nplora"
    assert lines[2] == "```bash"
    assert lines[3].endswith('pip install ".[demo]" && nplora demo')
    assert lines[4].endswith('pip install ".[test]" && python -m pytest')

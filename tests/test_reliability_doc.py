"""docs/RELIABILITY.md is checked mechanically against the tests it names.

Each table row is a fault case (``A1``, ``B6``, ``C12``, ...). Its last column names the tests
that show the promise: ``file.py::test_name`` (paths relative to ``tests/``; ``::test_name``
alone means the file named before it in the same cell; ``[...]`` parameters are allowed) or a
Rust test ``module::tests::name`` (a ``fn name`` in ``src/module.rs`` or ``src/module/``).

- every test a row names must exist, and a row names at least one (or says "not a test");
- naming rule: a Python test called ``test_<case>_...`` (e.g. ``test_b1_enospc_...``,
  ``test_a1_a2_a3_...``) is the test of those cases, so each of those rows must name it.
"""

from __future__ import annotations

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
DOC = os.path.join(ROOT, "docs", "RELIABILITY.md")

CASE = re.compile(r"^[A-K]\d{1,2}$")
PY_REF = re.compile(r"^(?:(?P<file>[\w/]+\.py))?::(?P<name>\w+)(?:\[[^\]]*\])?$")
RUST_REF = re.compile(r"^(?P<module>\w+)::tests::(?P<name>\w+)$")
# Not h: `test_h5_…` names the shard format, not case H5.
NAMED_CASES = re.compile(r"^test_((?:[a-gijk]\d{1,2}_)+)")


def _rows() -> list[tuple[str, str]]:
    """(case id, test cell) of every table row that names a case."""
    rows = []
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("| "):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if CASE.match(cells[0]):
                rows.append((cells[0], cells[-1]))
    return rows


def _python_tests() -> dict[str, set[str]]:
    """Test function names per file (relative to tests/)."""
    out: dict[str, set[str]] = {}
    for p in glob.glob(os.path.join(TESTS, "**", "test_*.py"), recursive=True):
        with open(p, encoding="utf-8") as f:
            tree = ast.parse(f.read(), p)
        out[os.path.relpath(p, TESTS)] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}
    return out


def _rust_fns(module: str) -> set[str]:
    files = [os.path.join(ROOT, "src", f"{module}.rs")] + glob.glob(os.path.join(ROOT, "src", module, "*.rs"))
    text = "".join(open(p, encoding="utf-8").read() for p in files if os.path.exists(p))
    return set(re.findall(r"\bfn (\w+)\s*\(", text))


def _refs(cell: str) -> list[tuple[str, str]]:
    """("py:file" | "rs:module", test name) for every test reference in a cell."""
    refs, current = [], None
    for tok in re.findall(r"`([^`]*)`", cell):
        m = PY_REF.match(tok)
        if m:
            current = m.group("file") or current
            assert current, f"{tok!r} has no file before it in: {cell}"
            refs.append((f"py:{current}", m.group("name")))
            continue
        m = RUST_REF.match(tok)
        if m:
            refs.append((f"rs:{m.group('module')}", m.group("name")))
        elif "test_" in tok or "::tests::" in tok or tok.endswith(".py"):
            # A test reference must be complete (no "…" abbreviations): only then can it be checked.
            assert tok.endswith(".py") and (os.path.exists(os.path.join(TESTS, tok)) or os.path.exists(os.path.join(ROOT, tok))), f"unparsable test reference {tok!r} in: {cell}"
    return refs


def test_every_row_names_tests_that_exist():
    py = _python_tests()
    rows = _rows()
    assert len(rows) > 50, "the table was not found"
    missing, empty = [], []
    for case, cell in rows:
        refs = _refs(cell)
        if not refs and "not a test" not in cell:
            empty.append(case)
        for where, name in refs:
            kind, file = where.split(":", 1)
            ok = name in py.get(file, set()) if kind == "py" else name in _rust_fns(file)
            if not ok:
                missing.append(f"{case}: {file}::{name}")
    assert not missing, "docs/RELIABILITY.md names tests that do not exist:\n" + "\n".join(missing)
    assert not empty, f"rows that name no test: {empty}"


def test_tests_named_for_a_case_are_listed_in_its_row():
    named = {case: {n for _, n in _refs(cell)} for case, cell in _rows()}
    unlisted = []
    for file, names in _python_tests().items():
        for n in names:
            m = NAMED_CASES.match(n)
            if not m:
                continue
            for case in m.group(1).strip("_").split("_"):
                if n not in named.get(case.upper(), set()):
                    unlisted.append(f"{file}::{n} is not listed in row {case.upper()}")
    assert not unlisted, "\n".join(sorted(unlisted))

"""The package's floors read the data path: no module imports from a floor above its own.

The floors, bottom to top, are the sub-packages of ``gradconflict`` listed in :data:`FLOORS` (the README's
layout section says what each is for). A module may import from its own floor and the floors below. The one
kind of exception is a convenience entry point that imports a higher floor lazily, inside the function that
needs it; each is listed in :data:`LAZY_UPWARD` with the reason, so a new one is a decision, not an accident.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import gradconflict

PACKAGE = pathlib.Path(gradconflict.__file__).parent

#: Floors, bottom to top.
FLOORS = (
    ("gradconflict._strict_json", "gradconflict._moved"),
    ("gradconflict.measure",),
    ("gradconflict.weighting",),
    ("gradconflict.records",),
    ("gradconflict.monitor",),
    ("gradconflict.diagnosis",),
    ("gradconflict.split",),
    ("gradconflict.fixtures",),
    ("gradconflict.reporting",),
    ("gradconflict.integrations",),
    ("gradconflict.apps",),
)

#: (importing module, imported floor): lazy imports up a floor that are allowed, and why.
LAZY_UPWARD = {
    # monitor.advise() is a shortcut for gradconflict.advise(monitor.history, model=monitor.model).
    ("gradconflict.monitor._monitor", "gradconflict.diagnosis"),
    # Jupyter shows an object through its own _repr_html_: each of these draws the HTML report's tables for it, and
    # loads the reporting floor only when a notebook displays one.
    ("gradconflict.measure.report", "gradconflict.reporting"),
    ("gradconflict.records.comparison", "gradconflict.reporting"),
    ("gradconflict.diagnosis.advice", "gradconflict.reporting"),
    # The advice counts the duplicated share and the candidate branch points on the blocks branch() copies
    # (split.model.backbone_blocks, split.branch.duplicated_share), so that the advice and the split agree.
    ("gradconflict.diagnosis.advice", "gradconflict.split"),
    ("gradconflict.split.evaluate", "gradconflict.reporting"),
}


def floor_of(module: str) -> int | None:
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block: its imports never run, so they count as lazy."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: pathlib.Path) -> list[tuple[str, bool, int]]:
    """(imported module, imported lazily (in a function or for type checking only), line) of every
    ``gradconflict`` import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or _type_checking(child)
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("gradconflict"):
                targets = [child.module]
                if child.module == "gradconflict":
                    targets = [f"gradconflict.{alias.name}" for alias in child.names]
                found.extend((target, inner, child.lineno) for target in targets)
            elif isinstance(child, ast.Import):
                found.extend((a.name, inner, child.lineno) for a in child.names if a.name.startswith("gradconflict"))
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) not in ("gradconflict", "gradconflict.__main__"))


def test_every_module_has_a_floor() -> None:
    assert [module_name(p) for p in MODULES if floor_of(module_name(p)) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_import_runs_up_a_floor(path: pathlib.Path) -> None:
    module = module_name(path)
    own = floor_of(module)
    assert own is not None
    upward = []
    for target, lazy, line in imports_of(path):
        level = floor_of(target)
        if level is None or level <= own:
            continue
        top = FLOORS[level][0]
        if lazy and (module, top) in LAZY_UPWARD:
            continue
        upward.append(f"line {line}: {target} (floor {level} above {own})")
    assert upward == []


def test_the_allowed_lazy_imports_are_still_there() -> None:
    """An entry of LAZY_UPWARD that no longer matches an import is stale: remove it."""
    seen = set()
    for path in MODULES:
        for target, lazy, _ in imports_of(path):
            level = floor_of(target)
            if lazy and level is not None:
                seen.add((module_name(path), FLOORS[level][0]))
    assert LAZY_UPWARD <= seen


def test_the_test_sees_an_upward_import(tmp_path: pathlib.Path) -> None:
    """The check itself can fail: a module-level import of the diagnosis from the measuring core is caught."""
    fake = tmp_path / "bad.py"
    fake.write_text("from gradconflict.diagnosis import advise\n")
    ((target, lazy, _),) = imports_of(fake)
    assert floor_of(target) > floor_of("gradconflict.measure.engine.tapped") and not lazy

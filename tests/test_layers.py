"""The floors of bnlab/, one folder each (docs/guide.md, Layout): imports go down the floors and never round in a
circle; results/ reads only the record and the schema, never the training code; schema/, record/, results/
and the face's module level import no torch. Function-level imports count; those under `if TYPE_CHECKING:`
(type hints only) do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bnlab"

# What each folder may import besides itself: the floors below it, and for results/ only what it reads.
MAY_IMPORT = {
    "schema": set(),
    "core": {"schema"},
    "record": {"schema"},
    "run": {"schema", "core", "record"},
    "results": {"schema", "record"},
    "face": {"schema", "core", "record", "run", "results"},
}
TORCH_FREE = {"schema", "record", "results", "face"}  # at module level: the face imports a run inside functions


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def folder(module: str) -> str:
    """The floor's folder of a bnlab module: bnlab.run.fused.engine -> run; bnlab.__main__ is the face's."""
    parts = module.split(".")
    return "face" if parts[1:] == ["__main__"] else (parts[1] if len(parts) > 1 else "")


def imports(tree: ast.AST, top_level_only: bool = False) -> set[str]:
    """The modules a file imports, anywhere in it (or only at module level) but under `if TYPE_CHECKING:`."""
    found, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        todo += list(ast.iter_child_nodes(node))
    return found


TREES = {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}
MODULES = set(TREES)
GRAPH = {m: {i for i in imports(tree) if i in MODULES} - {m} for m, tree in TREES.items()}


def crossings(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports that go up a floor, or across where a folder may not (results/ into run/, say)."""
    return {
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if folder(b) and folder(a) and folder(b) != folder(a) and folder(b) not in MAY_IMPORT[folder(a)]
    }


def test_every_module_lives_in_a_floor_folder():
    flat = {m for m in MODULES if folder(m) not in MAY_IMPORT and m != "bnlab"}
    assert not flat


def test_imports_go_down_the_floors():
    assert not crossings(GRAPH)


@pytest.mark.parametrize(
    "planted",
    [
        ("bnlab.core.norms", "bnlab.run.fused.stacking"),  # up a floor
        ("bnlab.schema.config", "bnlab.core.validate"),
        ("bnlab.results.analysis", "bnlab.run.train"),  # across, results into run
        ("bnlab.record.summary", "bnlab.core.models"),
        ("bnlab.run.train", "bnlab.face.app"),
    ],
)
def test_a_planted_import_is_caught(planted):
    importer, imported = planted
    assert crossings({**GRAPH, importer: GRAPH[importer] | {imported}}) == {planted}


def test_no_import_cycles():
    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(m == b or (m not in seen and reaches(m, b, seen | {m})) for m in GRAPH.get(a, ()))

    assert not [m for m in GRAPH if reaches(m, m, set())]


def test_the_launcher_does_not_import_the_cli():
    assert "bnlab.face.cli" not in GRAPH["bnlab.face.launcher"]


def test_torch_free_floors_import_no_torch_at_module_level():
    torch_users = {
        m
        for m, tree in TREES.items()
        if folder(m) in TORCH_FREE and any(i.split(".")[0] == "torch" for i in imports(tree, True))
    }
    assert not torch_users


def test_only_one_module_uses_hydras_private_api():
    private = {
        m
        for m, tree in TREES.items()
        if any(i.startswith(("hydra._internal", "hydra.core.singleton")) for i in imports(tree))
    }
    assert private == {"bnlab.face.hydra_private"}

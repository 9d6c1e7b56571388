"""The import layering of bnlab/ (docs/guide.md, Layout): imports go one way, down the layers, and never round in
a circle; the analysis reads only the summary contract; nothing below the Hydra face imports it.
Function-level imports count; imports under `if TYPE_CHECKING:` (type hints only) do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnlab"

# Layer of every module: a module may import modules of its own layer or below, never above.
LAYERS = {
    # the foundation, without torch but stacking and provenance: the config schema, the data sets' files, result
    # files, the console, metric names, the summary contract, the stacked layout, the import of the user's own code
    "bnlab.schema": 0,
    "bnlab.datafiles": 0,
    "bnlab.threads": 0,
    "bnlab.interrupts": 0,
    "bnlab.files": 0,
    "bnlab.console": 0,
    "bnlab.metrics": 0,
    "bnlab.summary": 0,
    "bnlab.stacking": 0,
    "bnlab.hparams": 0,
    "bnlab.provenance": 0,
    "bnlab.targets": 0,
    # the building blocks, each a registry
    "bnlab.data": 1,
    "bnlab.baselines": 1,
    "bnlab.norms": 1,
    "bnlab.models": 1,
    "bnlab.optim": 1,
    # a config's validation against the registries
    "bnlab.config": 2,
    # what one step needs
    "bnlab.diagnostics": 3,
    "bnlab.engine": 3,
    "bnlab.fused": 3,
    "bnlab.distributed": 3,
    # a run, and beside it the analysis of finished runs
    "bnlab.train": 4,
    "bnlab.analysis": 4,
    "bnlab.summarize": 4,
    "bnlab.figures": 4,
    "bnlab.report": 4,
    "bnlab.dashboard": 4,
    # one job: its outcome and exit code
    "bnlab.job": 5,
    # the Hydra face
    "bnlab.overrides": 6,
    "bnlab.app": 6,
    "bnlab.callbacks": 6,
    "bnlab.launcher": 6,
    "bnlab.hydra_plugin": 6,
    "bnlab.cli": 6,
    "bnlab.__main__": 6,
}
ANALYSIS = {"bnlab.analysis", "bnlab.summarize", "bnlab.figures", "bnlab.report", "bnlab.dashboard"}
READ_BY_ANALYSIS = {
    "bnlab.files",
    "bnlab.console",
    "bnlab.metrics",
    "bnlab.summary",
    "bnlab.hparams",
    "bnlab.schema",
    *ANALYSIS,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The bnlab modules that a file imports, anywhere in it but under `if TYPE_CHECKING:`."""
    found, todo = set(), [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        todo += list(ast.iter_child_nodes(node))
    return {m for m in found if m in LAYERS}


GRAPH = {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(LAYERS) | {"bnlab"}


def test_imports_go_down_the_layers():
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps if a in LAYERS and LAYERS[b] > LAYERS[a]]
    assert not upward


def test_no_import_cycles():
    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(m == b or (m not in seen and reaches(m, b, seen | {m})) for m in GRAPH.get(a, ()))

    assert not [m for m in GRAPH if reaches(m, m, set())]


def test_the_analysis_reads_only_the_summary_contract():
    assert not {(a, b) for a in ANALYSIS for b in GRAPH[a] - READ_BY_ANALYSIS}


def test_nothing_below_the_hydra_face_imports_it_and_the_launcher_not_the_cli():
    face = {m for m, layer in LAYERS.items() if layer == max(LAYERS.values())}
    assert not {(a, b) for a, deps in GRAPH.items() if a not in face for b in deps & face}
    assert "bnlab.cli" not in GRAPH["bnlab.launcher"]

"""The import contract of docs/architecture.md: imports go downwards only, and no two modules import each other.

The check reads every ``import`` of every module of ``comapoi_cli/`` (``ast``: an import inside a
function or under ``if TYPE_CHECKING:`` counts too) and maps each module to its layer. From the top:

    entry        comapoi_cli.__main__
    cli          comapoi_cli.cli
    plugins      comapoi_cli.default_plugins (the built-in plugins)
    services     pipeline > adapters > evaluation > training > data > runs > models
    core         every top-level module (reporting, errors, hookspecs, plugins, backends, roles, ...)

A module may import its own layer and the layers below it, never one above. Two tests plant a
violation in a copy of the package and see the check report it, so the check cannot pass vacuously.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "comapoi_cli"

#: Top first. A service package is a layer of its own: it may use the ones listed after it.
LAYERS = ("entry", "cli", "plugins", "pipeline", "adapters", "evaluation", "training", "data", "runs", "models", "core")
SERVICES = ("pipeline", "adapters", "evaluation", "training", "data", "runs", "models")

#: Upward imports that exist for typing only, each with its reason; the check requires them to stay
#: under ``if TYPE_CHECKING:`` (never imported at run time).
TYPING_ONLY = {
    ("comapoi_cli.backends", "comapoi_cli.training.job"):
        "Backend.train(job: TrainingJob) names the job type a backend trains; the job lives with training",
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    typing_only: bool

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.imported}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def imports_of(root: Path) -> list[Import]:
    """Every import of one ``comapoi_cli`` module by another (``root`` is the package folder)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    found: list[Import] = []
    for name, path in sorted(modules.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        typing_lines = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from comapoi_cli.models import tiny`` imports the module comapoi_cli.models.tiny
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]  # comapoi_cli.x.y.attr -> the module that holds it
                if target in modules and target != name:
                    found.append(Import(name, target, node.lineno, node.lineno in typing_lines))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return "entry"
    if len(parts) > 2 and parts[1] == "cli":
        return "cli"
    if len(parts) > 2 and parts[1] == "default_plugins":
        return "plugins"
    if len(parts) > 2 and parts[1] in SERVICES:
        return parts[1]
    if len(parts) == 2 and parts[1] in ("cli", "default_plugins", *SERVICES):
        return layer_of(module + ".__init__")
    return "core"


def upward_imports(root: Path) -> list[str]:
    """The imports that run up a layer (a typing-only one listed in ``TYPING_ONLY`` excepted)."""
    bad = []
    for imp in imports_of(root):
        if LAYERS.index(layer_of(imp.imported)) >= LAYERS.index(layer_of(imp.importer)):
            continue
        if (imp.importer, imp.imported) in TYPING_ONLY and imp.typing_only:
            continue
        bad.append(f"{imp} ({layer_of(imp.importer)} -> {layer_of(imp.imported)})")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (typing-only imports excluded)."""
    graph: dict[str, set[str]] = {}
    for imp in imports_of(root):
        if not imp.typing_only:
            graph.setdefault(imp.importer, set()).add(imp.imported)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _is_package_relative(module: str) -> bool:
    return module == "comapoi_cli" or module.startswith("comapoi_cli.")


# -- the contract over the real package ---------------------------------------------------------------

def test_the_check_reads_the_package():
    imports = imports_of(PACKAGE)
    assert len(imports) > 200
    assert all(_is_package_relative(i.importer) and _is_package_relative(i.imported) for i in imports)
    layers = {layer_of(i.importer) for i in imports}
    assert layers == set(LAYERS)


def test_imports_go_downwards_only():
    assert upward_imports(PACKAGE) == []


def test_no_two_modules_import_each_other():
    assert import_cycles(PACKAGE) == []


def test_the_typing_only_exceptions_are_still_needed_and_typing_only():
    imports = {(i.importer, i.imported): i for i in imports_of(PACKAGE)}
    for pair in TYPING_ONLY:
        assert pair in imports, f"{pair} is no longer imported: remove it from TYPING_ONLY"
        assert imports[pair].typing_only


def test_docs_state_the_same_layers():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    order = " > ".join(SERVICES)
    assert order in text, f"docs/architecture.md should give the services' order as '{order}'"


# -- the check fails on a planted violation -----------------------------------------------------------

def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "comapoi_cli"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_a_planted_upward_import_fails(tmp_path):
    copy = _copy(tmp_path)
    assert upward_imports(copy) == []
    with (copy / "runs" / "layout.py").open("a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from comapoi_cli.training.job import TrainingJob\n    return TrainingJob\n")
    with (copy / "roles.py").open("a", encoding="utf-8") as f:
        f.write("\nfrom comapoi_cli.cli import render  # noqa: E402\n")
    found = upward_imports(copy)
    assert len(found) == 2
    assert found[0].startswith("comapoi_cli.roles:") and found[0].endswith("(core -> cli)")
    assert "comapoi_cli.runs.layout" in found[1] and found[1].endswith("(runs -> training)")


def test_a_planted_typing_only_upward_import_fails_outside_the_list(tmp_path):
    copy = _copy(tmp_path)
    path = copy / "roles.py"
    path.write_text(path.read_text(encoding="utf-8").replace(
        "if TYPE_CHECKING:", "if TYPE_CHECKING:\n    from comapoi_cli.pipeline.runner import run_pipeline", 1),
        encoding="utf-8")
    assert [f for f in upward_imports(copy) if "comapoi_cli.pipeline.runner" in f]


def test_a_planted_cycle_fails(tmp_path):
    copy = _copy(tmp_path)
    assert import_cycles(copy) == []
    with (copy / "presets.py").open("a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from comapoi_cli import roles\n    return roles\n")
    assert import_cycles(copy) == [["comapoi_cli.presets", "comapoi_cli.roles"]]

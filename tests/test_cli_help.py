"""Help reads as Click writes it, through Typer's public ``cls=`` (``comapoi_cli/cli/base.py``), not by
patching Typer: a flag shows no value type (Typer alone shows ``<bool>`` after ``--json``, ``--help``,
``--packing/--no-packing``), a positional argument is ``FILE`` or ``[FILE]`` in the usage line (Typer
alone writes ``{file}``). A plugin's command gets the same."""

from __future__ import annotations

import ast

import pytest

from tests.support import REPO, run_comapoi
from tests.test_cli_startup import command_paths
from tests.test_plugins import critic_site  # noqa: F401  (the installed example plugin, a fixture)

PACKAGE = REPO / "comapoi_cli"
LIBRARIES = ("typer", "click", "rich")


def _check_help(text: str, command: str) -> None:
    assert "Show this message and exit." in text, text[-2000:]  # the help itself was printed
    assert "<bool>" not in text, f"`{command} --help` shows a type after a flag"
    options = text.split("Options", 1)[-1]
    assert "<str>" not in options and "<path>" not in options, f"`{command} --help` shows <str>/<path>, not TEXT/PATH"
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage, f"`{command} --help`: {usage.strip()}"


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "comapoi")
def test_help_shows_no_type_after_a_flag_and_arguments_as_click_writes_them(path):
    result = run_comapoi(*path, "--help")
    assert result.returncode == 0, result.stderr
    _check_help(result.stdout, " ".join(["comapoi", *path]))


def test_required_and_optional_arguments_in_usage_lines():
    assert "Usage: comapoi adapters show [OPTIONS] RUN_DIR" in run_comapoi("adapters", "show", "--help").stdout
    assert "Usage: comapoi data clean [OPTIONS] [INPUT]" in run_comapoi("data", "clean", "--help").stdout
    assert "Usage: comapoi adapters export [OPTIONS] RUN_DIRS..." in run_comapoi("adapters", "export", "--help").stdout


def test_a_plugin_command_reads_the_same(critic_site):  # noqa: F811
    result = run_comapoi("critic-example", "--help", env={"PYTHONPATH": str(critic_site)})
    assert result.returncode == 0, result.stderr
    _check_help(result.stdout, "comapoi critic-example")


def _library_names(tree: ast.Module) -> set[str]:
    """The names a module binds to Typer, Click or Rich objects (``import typer``, ``from typer.core import X``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in LIBRARIES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            names |= {a.asname or a.name for a in node.names}
    return names


def _patches(source: str) -> list[str]:
    """Assignments to an attribute of a Typer, Click or Rich object (``TyperOption.x = ...``, ``setattr(typer.core, ...)``)."""
    tree = ast.parse(source)
    names, found = _library_names(tree), []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for target in targets:
            base = target
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(target, ast.Attribute) and isinstance(base, ast.Name) and base.id in names:
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
    return found


def test_nothing_patches_typer_click_or_rich():
    sample = ("from typer.core import TyperOption, TyperArgument\nimport typer\n"
              "TyperOption.display_type_rich = lambda self, ctx: None\n"
              "TyperArgument._usage_display_name = str\nsetattr(typer.core, 'x', 1)\nparam = object()\n")
    assert [p.split(": ")[1] for p in _patches(sample)] == ["TyperOption.display_type_rich",
                                                            "TyperArgument._usage_display_name", "typer.core.?"]
    found = {str(path.relative_to(REPO)): _patches(path.read_text(encoding="utf-8"))
             for path in sorted(PACKAGE.rglob("*.py"))}
    assert {path: lines for path, lines in found.items() if lines} == {}

"""Every flag a message or hint can name exists on the command that prints it.

The check reads every string literal (f-strings too) of the command modules and of the services they
call, finds the ``--flags`` in it, and looks each up among the options of the commands of that area
(``--max_steps`` and ``--max-steps`` are one option). A string that names another command
(``comapoi data clean --on ...``) may use that command's flags; flags of other programs
(``accelerate launch``, ``pip``, ``vllm``, ``torchrun``, ``python``) are not comapoi's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer

PACKAGE = Path(__file__).resolve().parent.parent / "comapoi_cli"
#: Area -> (the files whose strings a command of the area prints, the commands of the area).
AREAS = {
    "train": (["cli/train.py", "training/*.py", "backends.py", "default_plugins/trl_backend.py"], ["train"]),
    "data": (["cli/data.py", "data/*.py"], ["data *", "train", "pipeline run"]),  # data/chain_inputs.py: pipeline run's inputs
    "eval": (["cli/eval.py", "evaluation/*.py"], ["eval", "eval *"]),
    # a run's record shows the train flags it was made with
    "adapters": (["cli/adapters.py", "adapters.py", "adapters_*.py", "adapters/*.py"], ["adapters *", "train"]),
    "env": (["cli/env.py", "environment.py"], ["env"]),
    "plugins": (["cli/plugins.py", "plugins.py"], ["plugins *", "train"]),  # roles are what train --type takes
}
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*[a-z0-9])")
OTHER_PROGRAMS = re.compile(r"\b(accelerate launch|accelerate|torchrun|pip install|pip|vllm serve|python -m|python)\b")
COMMAND = re.compile(r"\bcomapoi ((?:[a-z]+)(?: [a-z]+)?)")
#: Flags of other programs that comapoi passes on or prints as a command to run, by program.
EXTERNAL = {
    "accelerate launch (training/launch.py builds its arguments)": {"config-file", "num-machines", "mixed-precision",
                                                                    "dynamo-backend", "main-process-port", "multi-gpu"},
    "vllm serve (comapoi adapters export prints its command)": {"enable-lora", "max-loras", "max-lora-rank", "lora-modules"},
}
EVERYWHERE = {"help", "version"} | set().union(*EXTERNAL.values())


def _norm(flag: str) -> str:
    return flag.replace("_", "-")


def command_options() -> dict[str, set[str]]:
    """``"data clean"`` -> its option names (normalised), for every command of the real app."""
    from comapoi_cli.cli.app import app

    out: dict[str, set[str]] = {}

    def walk(command, prefix):
        opts = set()
        for param in getattr(command, "params", []):
            opts |= {_norm(o[2:]) for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("--")}
        out[" ".join(prefix)] = opts
        if hasattr(command, "list_commands"):
            ctx = command.context_class(command)
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*prefix, name])

    walk(typer.main.get_command(app), [])
    return out


def strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of a module that can reach a user (docstrings left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    found = []
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}" for v in node.values)
            found.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def _files(patterns: list[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in PACKAGE.glob(pattern)})


def _commands(options: dict[str, set[str]], names: list[str]) -> set[str]:
    allowed: set[str] = set()
    for name in names:
        if name.endswith(" *"):
            allowed |= set().union(*(v for k, v in options.items() if k.startswith(name[:-1])))
        else:
            allowed |= options.get(name, set())
    return allowed


def _cases():
    return [pytest.param(area, id=area) for area in AREAS]


@pytest.mark.parametrize("area", _cases())
def test_every_flag_in_a_message_exists(area):
    options = command_options()
    patterns, commands = AREAS[area]
    own = _commands(options, commands) | EVERYWHERE
    missing = []
    for path in _files(patterns):
        for line, text in strings(path):
            if "--" not in text:
                continue
            named = [m.group(1) for m in COMMAND.finditer(text)]
            allowed = own | _commands(options, [n for n in named if n in options]
                                      + [n.split()[0] + " *" for n in named if n.split()[0] in options])
            # flags after another program's name belong to it
            cut = OTHER_PROGRAMS.search(text)
            checked = text[:cut.start()] if cut else text
            for flag in FLAG.findall(checked):
                name = _norm(flag)
                if name not in allowed and not (name.startswith("no-") and name[3:] in allowed):
                    missing.append(f"{path.relative_to(PACKAGE)}:{line}: --{flag}")
    assert not missing, "flags named in messages that no command of the area has:\n" + "\n".join(missing)


def test_the_check_sees_flags():
    options = command_options()
    assert {"max-steps", "batch-size", "trust-remote-code", "dry-run"} <= options["train"]
    assert "on" in options["data clean"]
    texts = [t for _, t in strings(PACKAGE / "training" / "job.py")]
    assert any("--lora-dropout" in t for t in texts)

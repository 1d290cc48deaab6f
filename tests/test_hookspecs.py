"""Every hook is typed, documented (``:param:`` for each argument, as pytest's hookspecs) and tested.

As datasette does it: each hook name must appear in at least one other test file (a test that
exercises the hook through a plugin), and in docs/plugins.md.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from comapoi_cli import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if callable(fn) and getattr(fn, "comapoi_spec", None) is not None)


def test_there_are_hooks():
    assert {"register_backends", "register_agent_roles", "register_commands"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_typed_and_documented(hook):
    fn = getattr(hookspecs, hook)
    signature = inspect.signature(fn)
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{hook} has no docstring"
    for name, param in signature.parameters.items():
        assert param.annotation is not inspect.Parameter.empty, f"{hook}({name}) has no type"
        assert f":param {name}:" in doc, f"{hook}'s docstring does not describe {name} (':param {name}:')"
    assert signature.return_annotation is not inspect.Parameter.empty, f"{hook} has no return type"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    here = Path(__file__).resolve()
    tested_in = [p.name for p in (ROOT / "tests").glob("test_*.py") if p != here and hook in p.read_text(encoding="utf-8")]
    assert tested_in, f"no test uses the hook {hook}: add one that implements it in a plugin"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_in_the_plugin_docs(hook):
    assert f"`{hook}" in (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8"), f"docs/plugins.md lacks {hook}"

"""The documentation keeps up with the code."""

from __future__ import annotations

import inspect
import re

from comapoi_cli import hookspecs
from tests.support import REPO


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if getattr(fn, "comapoi_spec", None) is not None]


def test_every_hook_is_documented_with_its_signature():
    names = hook_names()
    assert {"register_backends", "register_agent_roles", "register_commands"} <= set(names)
    text = (REPO / "docs" / "plugins.md").read_text()
    for name in names:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert re.search(rf"^### `{name}\({re.escape(params)}\)`", text, re.M), f"docs/plugins.md lacks a section for {name}({params})"


def test_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme

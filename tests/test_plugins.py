"""The plugin system: built-ins and third-party plugins through the same hooks, failures isolated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comapoi_cli.plugins import build_registry
from tests.support import REPO, run_comapoi


def make_entry_point_plugin(site: Path, name: str, module_source: str) -> None:
    """Make a real installed plugin in ``site``: a module plus a dist-info with a ``comapoi`` entry point."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist = site / f"{name}-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(f"[comapoi]\n{name} = {name}\n")


@pytest.fixture(scope="module")
def critic_site(tmp_path_factory) -> Path:
    """The example role plugin (plugins/comapoi-critic) really installed, with pip, into a folder of its own."""
    target = tmp_path_factory.mktemp("critic-site")
    # built from a copy: a build in the checkout leaves build/ and *.egg-info there, and the
    # plugin would then look installed to every later run with the checkout on the path
    source = tmp_path_factory.mktemp("critic-source") / "comapoi-critic"
    shutil.copytree(REPO / "plugins" / "comapoi-critic", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


def test_builtins_register_through_hooks():
    registry = build_registry(load_entry_points=False)
    assert list(registry.roles) == ["agent1", "agent2", "agent3"]
    assert [registry.roles[r].display_name for r in registry.roles] == ["Profiler", "Forecaster", "Final_Predictor"]
    assert "trl" in registry.backends
    assert registry.training_types() == ["merged", "agent1", "agent2", "agent3"]
    builtins = {p.name: p for p in registry.plugins}
    assert builtins["trl_backend"].registered == ["backend trl"]
    assert builtins["comapoi_roles"].hooks == ["register_agent_roles"]


def test_plugins_list_json_shows_backends_roles_and_unsloth_reason():
    result = run_comapoi("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["trl"]["usable"] is True
    unsloth = backends["unsloth"]
    # this machine (and CI) has no Unsloth and no GPU: the plugin must say so, with what to install
    assert unsloth["usable"] is False
    assert unsloth["reason"]
    assert "unsloth" in unsloth["install_hint"]
    assert [r["id"] for r in data["roles"]][:3] == ["agent1", "agent2", "agent3"]
    assert {p["name"] for p in data["plugins"]} >= {"comapoi_roles", "trl_backend", "unsloth"}


def test_example_role_plugin_installed_is_listed_everywhere(critic_site):
    env = {"PYTHONPATH": str(critic_site)}
    listing = run_comapoi("plugins", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    role = next(r for r in data["roles"] if r["id"] == "agent4")
    assert role["display_name"] == "Critic"
    plugin = next(p for p in data["plugins"] if p["name"] == "critic")
    assert plugin["error"] is None and "role agent4" in plugin["registered"]
    assert plugin["source"].startswith("entry point (comapoi-critic 0.1.0")

    help_text = run_comapoi("train", "--help", env=env).stdout
    assert "agent4" in help_text
    # the plugin's register_commands hook added a command
    example = run_comapoi("critic-example", env=env)
    assert example.returncode == 0
    assert json.loads(example.stdout)["messages"][-1]["role"] == "assistant"


def test_example_role_validates_answers(critic_site, monkeypatch):
    monkeypatch.syspath_prepend(str(critic_site))
    from comapoi_critic import EXAMPLE_RECORD, Critic

    from comapoi_cli.roles import RoleContext

    role, context = Critic(), RoleContext(dataset="nyc")
    assert role.check_answer(EXAMPLE_RECORD["messages"][-1]["content"], EXAMPLE_RECORD, context) is None
    assert "10 unique ids" in role.check_answer('{"reranked_poi_ids": [1, 1, 2]}', EXAMPLE_RECORD, context)
    assert "outside" in role.check_answer(json.dumps({"reranked_poi_ids": list(range(5090, 5100))}), EXAMPLE_RECORD, context)
    assert role.target(EXAMPLE_RECORD) == "22"
    assert role.group_key(EXAMPLE_RECORD) == "0"


def test_broken_plugins_are_reported_not_fatal(tmp_path):
    make_entry_point_plugin(tmp_path, "broken_import", "raise ImportError('needs a package that is not installed')\n")
    make_entry_point_plugin(tmp_path, "unknown_hook", """
        from comapoi_cli import hookimpl

        @hookimpl
        def register_modles(register):  # typo: not a comapoi hook
            pass
        """)
    make_entry_point_plugin(tmp_path, "raises_in_hook", """
        from comapoi_cli import hookimpl

        @hookimpl
        def register_backends(register):
            raise RuntimeError('boom')
        """)
    make_entry_point_plugin(tmp_path, "duplicate_role", """
        from comapoi_cli import hookimpl
        from comapoi_cli.roles import AgentRole

        class Clash(AgentRole):
            id = "agent1"

        @hookimpl
        def register_agent_roles(register):
            register(Clash())
        """)
    env = {"PYTHONPATH": str(tmp_path)}
    listing = run_comapoi("plugins", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    errors = {p["name"]: p["error"] for p in json.loads(listing.stdout)["plugins"]}
    assert "ImportError: needs a package that is not installed" in errors["broken_import"]
    assert "register_modles" in errors["unknown_hook"]
    assert "register_backends failed: RuntimeError: boom" in errors["raises_in_hook"]
    assert "already registered" in errors["duplicate_role"]
    # the built-ins are untouched and other commands still work
    assert errors["comapoi_roles"] is None and errors["trl_backend"] is None
    roles = [r["display_name"] for r in json.loads(listing.stdout)["roles"]]
    assert roles.count("Profiler") == 1
    assert run_comapoi("train", "--help", env=env).returncode == 0
    human = run_comapoi("plugins", "list", env=env)
    assert "error: failed to import broken_import" in human.stdout


def test_comapoi_plugins_env_restricts_third_party_plugins(tmp_path, critic_site):
    make_entry_point_plugin(tmp_path, "broken_import", "raise ImportError('nope')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(critic_site)])}
    only_critic = json.loads(run_comapoi("plugins", "list", "--json", env={**env, "COMAPOI_PLUGINS": "critic"}).stdout)
    names = {p["name"] for p in only_critic["plugins"]}
    assert "critic" in names and "broken_import" not in names and "unsloth" not in names
    assert {"comapoi_roles", "trl_backend"} <= names  # built-ins always load
    none = json.loads(run_comapoi("plugins", "list", "--json", env={**env, "COMAPOI_PLUGINS": ""}).stdout)
    assert {p["name"] for p in none["plugins"]} == {"comapoi_roles", "trl_backend", "pipeline_engines", "pipeline_retrievers",
                                                           "teacher_engines", "checkin_readers"}


def test_unknown_backend_and_role_are_usage_errors():
    registry = build_registry(load_entry_points=False)
    with pytest.raises(Exception, match="registered backends: trl"):
        registry.backend("deepspeed-magic")
    with pytest.raises(Exception, match="registered roles: agent1, agent2, agent3"):
        registry.role("agent9")

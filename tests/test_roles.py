"""Role behaviour behind ``AgentRole``: every data-facing method core calls is declared on the base
class, core reaches roles only through the registry, and a third-party role supplies that behaviour."""

from __future__ import annotations

import ast
import inspect
import json
import os
from pathlib import Path

from comapoi_cli.roles import AgentRole, RoleContext
from tests.support import REPO, run_comapoi
from tests.test_plugins import make_entry_point_plugin

DATA_METHODS = ("check_answer", "check_target", "check_leak", "group_key", "target_ids")


def _imported_modules(tree: ast.AST, module: str) -> set[str]:
    names: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def test_no_module_but_plugins_imports_default_plugins():
    offenders = []
    package = REPO / "comapoi_cli"
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[1] == "default_plugins" or relative.as_posix() == "comapoi_cli/plugins.py":
            continue
        module = ".".join(relative.with_suffix("").parts)
        for name in _imported_modules(ast.parse(path.read_text(encoding="utf-8")), module):
            if name == "comapoi_cli.default_plugins" or name.startswith("comapoi_cli.default_plugins."):
                offenders.append(f"{relative}: {name}")
    assert not offenders, offenders


def test_the_import_check_sees_a_relative_import():
    tree = ast.parse("from ..default_plugins import comapoi_roles\nimport comapoi_cli.default_plugins.x\n")
    found = _imported_modules(tree, "comapoi_cli.data.stats")
    assert "comapoi_cli.default_plugins" in found and "comapoi_cli.default_plugins.x" in found


def test_agent_role_declares_each_data_method_with_a_default_and_docstring():
    members = list(vars(AgentRole))
    start = members.index("check_answer")
    assert tuple(members[start:start + len(DATA_METHODS)]) == DATA_METHODS  # declared together, in this order
    for name in DATA_METHODS:
        method = vars(AgentRole)[name]
        assert inspect.getdoc(method) and len(inspect.getdoc(method)) > 40, name
    role = AgentRole()
    record = {"messages": [{"role": "user", "content": "The true next POI is 12."},
                           {"role": "assistant", "content": '{"next_poi_id": [12, 3]}'}]}
    context = RoleContext()
    assert role.check_answer("x", record, context) is None and role.check_target("x", record, context) is None
    assert role.group_key(record) is None
    assert role.target_ids(record) == [12, 3]
    assert "true next POI" in role.check_leak(record, context)
    profile = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Likes 3 cafes, 2 parks."}]}
    assert AgentRole().target_ids(profile) is None and AgentRole().check_leak(profile, context) is None


ROLE_PLUGIN = '''
from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.roles import AgentRole


class Visits(AgentRole):
    id = "visits"
    display_name = "Visits"
    description = "A third-party role: groups by 'Person: NAME', targets 'place N'."
    data_file = "visits_train_samples.jsonl"

    def group_key(self, record):
        text = record["messages"][0]["content"]
        return text.split("Person: ", 1)[1].split()[0] if "Person: " in text else None

    def target_ids(self, record):
        answer = record["messages"][-1]["content"]
        return [int(answer.split("place ", 1)[1])] if "place " in answer else None

    def check_target(self, answer, record, context):
        return "a question is no target" if answer.endswith("?") else None

    def check_leak(self, record, context):
        return "names the place" if "place" in record["messages"][0]["content"] else None


@hookimpl
def register_agent_roles(register):
    register(Visits())
'''


def test_a_third_party_role_supplies_split_keys_targets_and_checks(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_entry_point_plugin(site, "visits_role", ROLE_PLUGIN)
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "COMAPOI_PLUGINS": "visits_role"}
    lines = []
    for i in range(40):
        person = f"p{i % 8}"
        lines.append({"messages": [{"role": "user", "content": f"Person: {person} walks on day {i}. Where next?"},
                                   {"role": "assistant", "content": f"To place {i % 5}"}]})
    lines.append({"messages": [{"role": "user", "content": "Person: p1 near place 3"},
                               {"role": "assistant", "content": "To place 3"}]})
    lines.append({"messages": [{"role": "user", "content": "Person: p2 on day 99"},
                               {"role": "assistant", "content": "Which one?"}]})
    data = tmp_path / "visits_train_samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))

    split = run_comapoi("data", "split", str(data), "--type", "visits", "--group-by", "user", "--test-size", "8",
                        "--json", env=env)
    assert split.returncode == 0, split.stderr
    summary = json.loads(split.stdout)
    assert summary["groups"] == 8 and summary["ungrouped"] == 0
    people = [{json.loads(x)["messages"][0]["content"].split()[1] for x in Path(summary[side]).read_text().splitlines()}
              for side in ("train_path", "holdout_path")]
    assert people[0] and people[1] and not people[0] & people[1]  # every person on one side only

    stats = run_comapoi("data", "stats", str(data), "--type", "visits", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    role = json.loads(stats.stdout)["roles"]["visits"]
    assert role["distinct_targets"] == 5 and role["label_leaks"] == 1 and role["wrong_targets"] == 1

    clean = run_comapoi("data", "clean", str(data), "--type", "visits", "--json", env=env)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["rejected"] == {"wrong_target": 1, "label_leak": 1}

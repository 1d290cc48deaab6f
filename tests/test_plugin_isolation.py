"""Plugin code never takes comapoi down: ``sys.exit()`` at import, a backend whose usability check raises,
a plugin command that would replace a built-in command. Each is reported against its plugin; every
command still works. Real plugins: a module and a dist-info with a ``comapoi`` entry point, written into
a temporary folder on PYTHONPATH, run through the real CLI."""

from __future__ import annotations

import json

from tests.support import run_comapoi
from tests.test_plugins import make_entry_point_plugin


def _plugins(tmp_path):
    make_entry_point_plugin(tmp_path, "exits_at_import", "import sys\nsys.exit(3)\n")
    make_entry_point_plugin(tmp_path, "raising_backend", """
        from comapoi_cli import hookimpl
        from comapoi_cli.backends import Backend

        class Fragile(Backend):
            name = "fragile"
            description = "its check raises"

            def unusable_reason(self):
                raise SystemExit("the check ended the program")

        @hookimpl
        def register_backends(register):
            register(Fragile())
        """)
    make_entry_point_plugin(tmp_path, "replaces_train", """
        from comapoi_cli import hookimpl

        @hookimpl
        def register_commands(app):
            @app.command("train")
            def train():
                print("HIJACKED")

            @app.command("fine")
            def fine():
                print("FINE")
        """)
    make_entry_point_plugin(tmp_path, "exits_in_commands", """
        import sys
        from comapoi_cli import hookimpl

        @hookimpl
        def register_commands(app):
            sys.exit(4)
        """)
    return {"PYTHONPATH": str(tmp_path)}


def test_broken_plugin_code_is_reported_against_the_plugin_and_never_fatal(tmp_path):
    env = _plugins(tmp_path)
    listing = run_comapoi("plugins", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    errors = {p["name"]: p["error"] for p in data["plugins"]}
    assert "SystemExit" in errors["exits_at_import"] and "failed to import" in errors["exits_at_import"]
    assert "SystemExit" in errors["exits_in_commands"]
    assert "'train' is already a comapoi command" in errors["replaces_train"]
    fragile = next(b for b in data["backends"] if b["name"] == "fragile")
    assert fragile["usable"] is False and "SystemExit" in fragile["reason"]
    assert errors["comapoi_roles"] is None and errors["trl_backend"] is None

    # the built-in train is still the real one, and the plugin's whole register_commands was undone
    train = run_comapoi("train", "--dry-run", "--backend", "fragile", env=env)
    assert train.returncode == 0, train.stderr
    assert "HIJACKED" not in train.stdout
    report = json.loads(train.stdout)
    assert any("backend fragile is not usable here" in p and "SystemExit" in p for p in report["problems"])
    assert run_comapoi("fine", env=env).returncode == 2  # not added: the plugin's commands go together
    for args in (["env", "--json"], ["--help"], ["plugins", "list"]):
        result = run_comapoi(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_training_with_a_backend_whose_check_raises_is_one_sentence(tmp_path):
    env = _plugins(tmp_path)
    result = run_comapoi("train", "--backend", "fragile", "--max-steps", "1", env=env)
    assert result.returncode == 1
    assert "Backend fragile is not usable here: its usability check failed (SystemExit" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_plugin_installed_after_a_run_is_found(tmp_path):
    """The entry-point cache follows what is installed: a new distribution on sys.path is seen at once."""
    site = tmp_path / "site"
    site.mkdir()
    env = {"PYTHONPATH": str(site), "COMAPOI_CACHE_DIR": str(tmp_path / "cache")}
    first = json.loads(run_comapoi("plugins", "list", "--json", env=env).stdout)
    assert "late" not in {p["name"] for p in first["plugins"]}
    assert (tmp_path / "cache" / "entry-points.json").is_file()
    make_entry_point_plugin(site, "late", "")
    second = json.loads(run_comapoi("plugins", "list", "--json", env=env).stdout)
    assert "late" in {p["name"] for p in second["plugins"]}


def test_engines_and_retrievers_go_through_the_same_registry_and_failure_policy(tmp_path):
    """A plugin whose register_engines calls sys.exit is recorded against the plugin (it used to end
    ``pipeline run`` silently with exit code 4); a plugin's engines and retrievers are listed."""
    make_entry_point_plugin(tmp_path, "exits_in_engines", """
        import sys
        from comapoi_cli import hookimpl

        @hookimpl
        def register_engines(register):
            sys.exit(4)
        """)
    make_entry_point_plugin(tmp_path, "echo_engine", """
        from comapoi_cli import hookimpl
        from comapoi_cli.engines import Engine
        from comapoi_cli.retrievers import Retriever

        class Echo(Engine):
            name = "echo"
            description = "says the prompt back"

        class Nearest(Retriever):
            name = "nearest"
            description = "the nearest POIs"

        @hookimpl
        def register_engines(register):
            register(Echo())

        @hookimpl
        def register_retrievers(register):
            register(Nearest())
            register(Nearest())
        """)
    env = {"PYTHONPATH": str(tmp_path)}
    listing = run_comapoi("plugins", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    errors = {p["name"]: p["error"] for p in data["plugins"]}
    registered = {p["name"]: p["registered"] for p in data["plugins"]}
    assert errors["exits_in_engines"] == "register_engines failed: SystemExit(4): the plugin tried to end the program"
    assert registered["pipeline_engines"] == ["engine transformers", "engine openai"]
    assert registered["pipeline_retrievers"] == ["retriever transitions"]
    assert registered["echo_engine"] == ["engine echo"]  # its retrievers were refused together: a name twice
    assert errors["echo_engine"] == "register_retrievers failed: ValueError: retriever 'nearest' is registered twice"
    assert {e["name"] for e in data["engines"]} == {"transformers", "openai", "template", "echo"}
    assert [r["name"] for r in data["retrievers"]] == ["transitions"]
    table = run_comapoi("plugins", "list", env=env)
    assert "Pipeline engines" in table.stdout and "says the prompt back" in table.stdout
    assert "engine transformers, engine openai" in table.stdout

    test = tmp_path / "nyc_test.jsonl"
    test.write_text("")
    result = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(test), "--merged",
                         str(tmp_path / "no_run"), "--engine", "nosuch", env=env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Unknown engine 'nosuch'; registered engines: echo, openai, template, transformers." in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_while_a_plugin_imports_is_one_line(tmp_path):
    make_entry_point_plugin(tmp_path, "slow_import", "raise KeyboardInterrupt\n")
    for args in (["--help"], ["plugins", "list"], ["nosuch"]):
        result = run_comapoi(*args, env={"PYTHONPATH": str(tmp_path)})
        assert result.returncode == 130, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
    assert "Interrupted." in run_comapoi("--help", env={"PYTHONPATH": str(tmp_path)}).stderr

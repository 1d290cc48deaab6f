"""`comapoi --help` and every sub-command's `--help` start fast: no torch, transformers, trl, ..."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from tests.support import REPO, run_comapoi

HEAVY = ("torch", "transformers", "trl", "datasets", "peft", "bitsandbytes", "accelerate", "unsloth")


def command_paths() -> list[list[str]]:
    """Every command path of the real app, e.g. ['data', 'clean'], found by walking its click tree."""
    from comapoi_cli.cli.app import app

    paths: list[list[str]] = [[]]

    def walk(command, prefix):
        if not hasattr(command, "list_commands"):
            return
        ctx = command.context_class(command)
        for name in command.list_commands(ctx):  # the root group loads its commands lazily
            sub = command.get_command(ctx, name)
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def imported_modules(args: list[str]) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "comapoi_cli", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if not name.startswith("package"):
                modules.add(name)
    return modules


def test_every_group_exists():
    paths = {" ".join(p) for p in command_paths()}
    for expected in ("data clean", "data split", "data merge", "data stats", "data synth", "train",
                     "adapters list", "plugins list", "env"):
        assert expected in paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "comapoi")
def test_help_imports_no_heavy_package(path):
    modules = loaded_modules([*path, "--help"])  # sys.modules: also what importlib imported (lazy commands)
    assert "comapoi_cli.cli.app" in modules  # the measurement itself works
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"`comapoi {' '.join(path)} --help` imported {heavy[:5]}"


def test_bad_flag_is_one_message_and_exit_2():
    result = run_comapoi("train", "--no-such-flag")
    assert result.returncode == 2
    assert "No such option" in result.stderr
    assert "Traceback" not in result.stderr


def loaded_modules(args: list[str]) -> set[str]:
    """``sys.modules`` after ``comapoi ARGS`` ran in a fresh interpreter (importlib imports included)."""
    code = ("import sys\nfrom comapoi_cli.cli.app import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('MODULES', ' '.join(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    line = next(line for line in result.stdout.splitlines() if line.startswith("MODULES "))
    return set(line.split()[1:])


def test_commands_load_only_when_they_run():
    """`comapoi --help` imports no command module; `comapoi env --help` imports only its own."""
    from comapoi_cli.cli.app import COMMANDS

    modules = {name: target.split(":")[0] for name, (target, _) in COMMANDS.items()}
    root = loaded_modules(["--help"])
    assert "comapoi_cli.cli.app" in root
    assert not (set(modules.values()) & root), sorted(set(modules.values()) & root)
    env_only = loaded_modules(["env", "--help"])
    assert modules["env"] in env_only
    assert not ({m for n, m in modules.items() if n != "env"} & env_only)
    listing = run_comapoi("--help")
    for name, (_, summary) in COMMANDS.items():  # each command is listed with its one-line help
        assert name in listing.stdout and summary.split()[0] in listing.stdout


def test_snake_and_kebab_spellings_work_on_every_command(tmp_path):
    """One vocabulary: --max_steps and --max-steps, --output_dir and --output-dir, are one option everywhere."""
    for args in (["--min-checkins", "14"], ["--min_checkins", "14"]):
        result = run_comapoi("data", "synth", "--data-dir", str(tmp_path), "--trajectories", "3", *args)
        assert result.returncode == 0, result.stderr
    assert run_comapoi("eval", "score", "--skip_invalid", "--help").returncode == 0
    bad = run_comapoi("adapters", "list", "--no_such_flag")
    assert bad.returncode == 2 and "No such option" in bad.stderr


def test_no_bool_metavar_in_help():
    for path in (["--help"], ["train", "--help"], ["data", "clean", "--help"], ["env", "--help"]):
        out = run_comapoi(*path).stdout
        assert "<bool>" not in out, path


def test_help_loads_no_plugin_unless_one_adds_a_command(tmp_path):
    """`comapoi --help` imports a plugin only when it may add a command: a plugin seen, unchanged, without
    ``register_commands`` is not imported again (cached metadata); editing it to add one is seen at once."""
    from tests.test_plugins import make_entry_point_plugin

    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "imported"
    source = (f"import pathlib\nfrom comapoi_cli import hookimpl\n"
              f"with pathlib.Path({str(marker)!r}).open('a') as f:\n    f.write('x')\n")
    make_entry_point_plugin(site, "quiet_plugin", source)
    env = {"PYTHONPATH": str(site), "COMAPOI_CACHE_DIR": str(tmp_path / "cache")}
    listing = run_comapoi("plugins", "list", "--json", env=env)  # loads every plugin and records its hooks
    assert listing.returncode == 0, listing.stderr
    assert marker.read_text() == "x"
    for args in (["--help"], ["--version"], ["data", "--help"]):
        result = run_comapoi(*args, env=env)
        assert result.returncode == 0, result.stderr
    assert marker.read_text() == "x"  # not imported again
    assert "hello" not in run_comapoi("--help", env=env).stdout

    import os
    import time

    (site / "quiet_plugin.py").write_text(source + "\n@hookimpl\ndef register_commands(app):\n"
                                          "    @app.command('hello')\n    def hello():\n        print('HELLO')\n")
    later = time.time() + 5
    os.utime(site / "quiet_plugin.py", (later, later))  # a new mtime even on a coarse clock
    result = run_comapoi("--help", env=env)
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout and marker.read_text() == "xx"
    assert run_comapoi("hello", env=env).stdout.strip() == "HELLO"
    assert "hello" in run_comapoi("--help", env=env).stdout  # a plugin with commands is always loaded


def test_no_built_in_plugin_adds_a_command():
    """`comapoi --help` relies on it: only third-party plugins are asked for commands."""
    from comapoi_cli.plugins import build_registry

    registry = build_registry(load_entry_points=False)
    assert all("register_commands" not in p.hooks for p in registry.plugins)


def test_the_entry_point_cache_keeps_several_sys_paths(tmp_path):
    """Two ``sys.path`` configurations used in turn (another folder on PYTHONPATH, another cwd for ``-m``)
    do not evict each other: the second start of each reads the cache, it does not scan the installed
    distributions again (which imports ``importlib.metadata``)."""
    env = {"COMAPOI_CACHE_DIR": str(tmp_path / "cache")}
    scanned = []
    for folder in ("a", "b", "a", "b"):
        (tmp_path / folder).mkdir(exist_ok=True)
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "comapoi_cli", "--help"],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                                    [str(REPO), str(tmp_path / folder)])})
        assert result.returncode == 0, result.stderr[-2000:]
        scanned.append(any(line.rstrip().endswith("| importlib.metadata") for line in result.stderr.splitlines()))
    assert scanned == [True, True, False, False]

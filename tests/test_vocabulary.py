"""One vocabulary, literal output: output locations, install lines printed with their extras, errors in
the user's words."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.support import run_comapoi

WIDE = {"COLUMNS": "400"}
TAG = re.compile(r"(?<!\\)\[[a-z#/@][^\[]*?\]")  # what Rich reads as a markup tag (not escaped with a backslash)  # so that a table cell holds the whole install line on one line


def install_line(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if "pip install" in line)
    words = shlex.split(line[line.index("pip install"):].strip(" │|"))
    return words


def _check_line(words: list[str]) -> None:
    plugin = next(w for w in words if w.endswith("[unsloth]"))
    folder = Path(plugin[: -len("[unsloth]")])
    assert folder.is_absolute() and (folder / "pyproject.toml").is_file(), plugin
    constraints = Path(words[words.index("-c") + 1])
    assert constraints.is_absolute() and constraints.is_file()
    assert any(w.startswith("torch==") for w in words)


def test_env_and_plugins_list_print_the_unsloth_install_line_with_its_extra():
    no_plugin = {**WIDE, "COMAPOI_PLUGINS": ""}
    for args in (["env"], ["plugins", "list"]):
        result = run_comapoi(*args, env=no_plugin)
        assert result.returncode == 0, result.stderr
        _check_line(install_line(result.stdout))
    data = json.loads(run_comapoi("plugins", "list", "--json", env=no_plugin).stdout)
    _check_line(shlex.split(data["unsloth_install"]))


def test_installed_but_unusable_unsloth_shows_its_install_hint_literally():
    data = json.loads(run_comapoi("plugins", "list", "--json").stdout)
    backend = next((b for b in data["backends"] if b["name"] == "unsloth"), None)
    if backend is None or backend["usable"]:
        return  # the plugin is not installed here, or Unsloth really is: nothing to hint
    _check_line(install_line(backend["install_hint"]))
    result = run_comapoi("plugins", "list", env=WIDE)  # the table cell may fold the line: compare without the folds
    assert result.returncode == 0
    # the "usable" column of the Backends table, read cell by cell (other columns may fold beside it)
    backends = result.stdout.split("Backends", 1)[1].split("└", 1)[0]
    cells = [line.split("│")[2] for line in backends.splitlines() if line.count("│") >= 4]
    flat = "".join("".join(cells).split())
    assert "".join(backend["install_hint"].split()) in flat and "[unsloth]" in result.stdout


def test_backend_unsloth_without_the_plugin_says_it_is_a_plugin():
    result = run_comapoi("train", "--backend", "unsloth", "--dry-run", env={**WIDE, "COMAPOI_PLUGINS": ""})
    assert result.returncode == 2
    assert "The unsloth backend is a plugin" in result.stderr
    words = install_line(result.stderr)
    _check_line(words)
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        assert result.stderr.index("needs an NVIDIA GPU") < result.stderr.index("pip install")


def test_unknown_choice_is_in_the_users_words():
    result = run_comapoi("train", "--type", "agent9", "--dry-run")
    assert result.returncode == 2
    assert "unknown --type 'agent9'; choose merged, agent1, agent2, agent3" in result.stderr
    assert "Input should" not in result.stderr  # not pydantic's words


def test_non_finite_and_out_of_range_numbers_are_one_sentence():
    for args, words in ((["train", "--learning_rate", "inf", "--dry-run"], "--learning-rate must be a finite number"),
                        (["train", "--learning-rate", "nan", "--dry-run"], "--learning-rate must be a finite number"),
                        (["train", "--max-steps", "0", "--dry-run"], "--max-steps must be at least 1"),
                        (["train", "--weight-decay", "-1", "--dry-run"], "--weight-decay must not be negative"),
                        (["eval", "--adapter", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
                        (["data", "stats", "--chars-per-token", "inf"], "--chars-per-token must be a finite number"),
                        # pipeline's numbers in the same words (they were Typer's: "Input should be greater than ...")
                        (["pipeline", "run", "--dataset", "nyc", "--test", "x", "--batch-size", "0"],
                         "--batch-size must be at least 1"),
                        (["pipeline", "run", "--dataset", "nyc", "--test", "x", "--request-timeout", "inf"],
                         "--request-timeout must be a finite number"),
                        (["pipeline", "score", "x", "--top-k", "0"], "--top-k must be at least 1")):
        result = run_comapoi(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert "Input should" not in result.stderr, (args, result.stderr)


def test_output_folders_are_output_dir_and_old_spellings_still_work(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    for command, new, old in ((["adapters", "merge"], "--output-dir", "--output"),
                              (["adapters", "export"], "--output-dir", "--to")):
        helptext = run_comapoi(*command, "--help").stdout
        assert new in helptext and f"{old} " not in helptext
        for flag in (new, old):
            result = run_comapoi(*command, str(tmp_path), flag, str(tmp_path / "out"))
            assert result.returncode != 0 and "is not a training run" in result.stderr, (command, flag, result.stderr)
    synth = run_comapoi("data", "synth", "--output-dir", str(tmp_path / "d"), "--trajectories", "3")
    assert synth.returncode == 0 and (tmp_path / "d" / "nyc").is_dir(), synth.stderr
    old = run_comapoi("data", "synth", "--out", str(tmp_path / "e"), "--trajectories", "3")
    assert old.returncode == 0 and (tmp_path / "e" / "nyc").is_dir(), old.stderr


def test_trust_remote_code_is_on_every_command_that_loads_a_model():
    for command in (["train"], ["eval"], ["adapters", "merge"], ["data", "clean"], ["data", "stats"]):
        assert "--trust-remote-code" in run_comapoi(*command, "--help", env=WIDE).stdout, command
    job = json.loads(run_comapoi("train", "--trust_remote_code", "--dry-run").stdout)["job"]
    assert job["trust_remote_code"] is True


def test_no_help_text_has_brackets_rich_would_eat():
    """Help is rendered as Rich markup: a `[...]` in a help text would vanish (use show_default for defaults)."""
    import typer

    from comapoi_cli.cli.app import app
    from tests.test_hint_flags import command_options  # noqa: F401  (the same walk of the real app)

    bad = []

    def walk(command, prefix):
        for param in getattr(command, "params", []):
            if TAG.search(getattr(param, "help", None) or ""):
                bad.append(f"{' '.join(prefix)} {param.opts}: {param.help}")
        if hasattr(command, "list_commands"):
            ctx = command.context_class(command)
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*prefix, name])

    walk(typer.main.get_command(app), ["comapoi"])
    assert not bad, bad
    merge_help = run_comapoi("adapters", "merge", "--help", env=WIDE).stdout
    assert "the one run.json records" in merge_help

"""`comapoi --help` lists the commands plugins add without loading any plugin, once they were recorded.

The first `comapoi --help` after a plugin is installed or changed loads the plugins (pluggy, the
built-in plugins, each entry point) and records what help shows of their commands; the next ones
list them from that record (`entrypoints.cached_plugin_commands`), with the same output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.support import REPO
from tests.test_plugins import critic_site  # noqa: F401  (the installed example plugin, a fixture)

CODE = ("import sys\nfrom comapoi_cli.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('LOADED', 'comapoi_critic' in sys.modules, 'pluggy' in sys.modules, file=sys.stderr)")


def _help(env: dict[str, str], *args: str) -> tuple[str, str]:
    """(standard output, which of the critic plugin and pluggy were imported) of ``comapoi ARGS --help``."""
    result = subprocess.run([sys.executable, "-c", CODE, *args, "--help"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=120)
    loaded = next(line for line in result.stderr.splitlines() if line.startswith("LOADED "))
    return result.stdout, loaded


def test_help_lists_plugin_commands_from_the_record_without_loading_plugins(critic_site, tmp_path):  # noqa: F811
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "COMAPOI_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(critic_site)])}
    first, loaded = _help(env)
    assert "critic-example" in first and "Print one valid agent4 (Critic) training record" in first
    assert loaded == "LOADED True True"  # nothing recorded yet: the plugins load
    second, loaded = _help(env)
    assert second == first
    assert loaded == "LOADED False False"  # listed from the record: no plugin, not even pluggy
    assert "critic-example" in _help(env, "critic-example")[0]  # the command itself still loads the plugin

    # a changed plugin is loaded again (its record no longer matches) and recorded anew
    module = critic_site / "comapoi_critic" / "__init__.py"
    later = time.time_ns() + 10**9
    os.utime(module, ns=(later, later))
    third, loaded = _help(env)
    assert third == first and loaded == "LOADED True True"
    assert _help(env)[1] == "LOADED False False"

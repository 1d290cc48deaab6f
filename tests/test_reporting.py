"""Services never print with Rich nor import the command line: they report through ``comapoi_cli.reporting.Reporter``.

The check reads the import statements of every module of the service packages (``ast``, so an import
inside a function counts too) and fails on ``rich`` or ``comapoi_cli.cli``.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "comapoi_cli"
SERVICES = ("data", "training", "evaluation", "adapters", "runs", "models", "pipeline")
FORBIDDEN = ("rich", "comapoi_cli.cli")


def service_modules() -> list[Path]:
    files = []
    for name in SERVICES:
        folder = PACKAGE / name
        if folder.is_dir():
            files += sorted(folder.rglob("*.py"))
        elif (PACKAGE / f"{name}.py").is_file():
            files.append(PACKAGE / f"{name}.py")
    return files


def imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_the_check_finds_the_service_packages_and_catches_an_import(tmp_path):
    assert len(service_modules()) > 10
    assert {p.parent.name for p in service_modules()} >= {"data", "training", "evaluation"}
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from rich.console import Console\n    from comapoi_cli.cli import render\n")
    assert [n for _, n in imported_names(sample) if forbidden(n)] == ["rich.console", "rich.console.Console",
                                                                       "comapoi_cli.cli", "comapoi_cli.cli.render"]


def _cases() -> list:
    return service_modules()


@pytest.mark.parametrize("path", _cases(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_service_imports_no_rich_and_no_cli(path):
    bad = [f"line {line}: {name}" for line, name in imported_names(path) if forbidden(name)]
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_console_reporter_renders_literally_and_shows_generic_progress():
    from rich.console import Console

    from comapoi_cli.cli.reporting import ConsoleReporter

    out = io.StringIO()
    reporter = ConsoleReporter(Console(file=out, force_terminal=True, width=120, color_system=None))
    reporter.info("install ./plugins/comapoi-unsloth[unsloth] now")
    reporter.warn("a [bold]bracket[/bold] stays")
    reporter.table("t[1]", ["col[a]"], [["v[x]"]])
    reporter.progress_start(10, description="scoring", unit="records")
    reporter.progress_update(5)
    reporter.progress_stop()
    text = out.getvalue()
    assert "comapoi-unsloth[unsloth]" in text and "[bold]bracket[/bold]" in text
    assert "t[1]" in text and "col[a]" in text and "v[x]" in text
    assert "scoring" in text and "5/10" in text and "records" in text and "ETA" in text


def test_progress_rate_and_eta_are_richs_on_a_terminal_and_in_plain_lines(monkeypatch):
    import time

    from rich.console import Console

    from comapoi_cli.cli import reporting

    monkeypatch.setattr(reporting, "PLAIN_EVERY_S", 0.0)
    texts = {}
    for terminal in (False, True):
        out = io.StringIO()
        reporter = reporting.ConsoleReporter(Console(file=out, force_terminal=terminal, width=160, color_system=None))
        reporter.progress_start(6, 2, description="chain", unit="trajectories")
        for done in range(3, 7):
            time.sleep(0.02)
            reporter.progress_update(done, rate=999.0, eta_s=999.0, in_flight=3)  # a service's own figures: not shown
        reporter.progress_stop()
        reporter.progress_start(3_000_000, description="cleaning f", unit="bytes")
        for done in (1_000_000, 2_000_000, 3_000_000):
            time.sleep(0.02)
            reporter.progress_update(done)
        reporter.progress_stop()
        texts[terminal] = out.getvalue()
    plain = texts[False].splitlines()
    assert plain[0].startswith("chain: 3/6 trajectories  -  3 in flight  ETA")  # one update: no rate yet
    assert plain[3].startswith("chain: 6/6 trajectories  ") and " trajectories/s  3 in flight  ETA 0:00" in plain[3], plain
    assert "999" not in texts[False] and "999" not in texts[True]
    assert "trajectories/s" in texts[True] and "6/6" in texts[True] and "0:00:00" in texts[True]  # TimeRemainingColumn
    assert "3.0/3.0 MB" in texts[True] and "MB/s" in texts[True]  # DownloadColumn, TransferSpeedColumn

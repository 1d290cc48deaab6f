"""``comapoi plugins``: what is installed and what it registered."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from comapoi_cli.cli.base import App
from comapoi_cli.cli.render import console, markup, print_json, table

app = App(help="Inspect plugins: backends, agent roles, engines, retrievers, and plugins that failed to load.", no_args_is_help=True)


@app.command("list")
def list_plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List plugins, the backends (usable here or why not), agent roles, engines and retrievers they register."""
    from comapoi_cli.cli.app import add_plugin_commands
    from comapoi_cli.plugins import get_registry

    registry = get_registry()
    add_plugin_commands()  # so that a plugin whose register_commands fails is listed with its error
    backends = [b.describe() for b in registry.backends.values()]
    roles = [r.describe() for r in registry.roles.values()]
    engines = [e.describe() for e in registry.engines.values()]
    retrievers = [r.describe() for r in registry.retrievers.values()]
    plugins = [p.to_dict() for p in registry.plugins]
    if as_json:
        out: dict[str, Any] = {"plugins": plugins, "backends": backends, "roles": roles, "engines": engines,
                               "retrievers": retrievers}
        if "unsloth" not in registry.backends:
            from comapoi_cli.environment import unsloth_install_line

            out["unsloth_install"] = unsloth_install_line()
        print_json(out)
        return
    console.print(table(
        "Plugins", ["plugin", "source", "registers", "status"],
        [(p["name"], p["source"], ", ".join(p["registered"]) or "-",
          markup(f"[red]error: {escape(str(p['error']))}[/red]") if p["error"] else markup("[green]ok[/green]"))
         for p in plugins],
    ))
    console.print(table(
        "Backends", ["backend", "usable", "needs", "description"],
        [(b["name"],
          markup("[green]yes[/green]") if b["usable"] else markup(
              f"[red]unusable: {escape(str(b['reason']))}[/red]"
              + (f"\n[dim]install: {escape(b['install_hint'])}[/dim]" if b["install_hint"] else "")),
          ", ".join(b["requires"]), b["description"]) for b in backends],
    ))
    console.print(table(
        "Agent roles (train --type)", ["id", "name", "data file", "description"],
        [(r["id"], r["display_name"], r["data_file"], r["description"]) for r in roles],
    ))
    console.print(table(
        "Pipeline engines (comapoi pipeline run --engine)", ["engine", "description"],
        [(e["name"], e["description"]) for e in engines],
    ))
    console.print(table(
        "Retrievers (comapoi pipeline run --retriever)", ["retriever", "description"],
        [(r["name"], r["description"]) for r in retrievers],
    ))
    if "unsloth" not in registry.backends:
        from comapoi_cli.environment import unsloth_hint

        console.print(f"The unsloth backend is a plugin, not installed here. {escape(unsloth_hint())}",
                      soft_wrap=True, highlight=False)

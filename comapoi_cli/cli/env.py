"""``comapoi env``: the truth about this machine."""

from __future__ import annotations

import typer
from rich.markup import escape

from comapoi_cli.cli.base import App
from comapoi_cli.cli.render import console, markup, print_json, table


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Show package versions, CUDA and GPUs, and which training backends are usable here (and why not)."""
    from comapoi_cli.environment import environment_report
    from comapoi_cli.plugins import get_registry

    report = environment_report(registry=get_registry())
    if as_json:
        print_json(report)
        return
    console.print(f"Python {escape(report['python'])} on {escape(report['platform'])}", soft_wrap=True)
    console.print(table("Packages", ["package", "version"],
                        [(k, v or markup("[dim]not installed[/dim]")) for k, v in report["packages"].items()]))
    cuda = report["cuda"]
    if cuda is None:
        console.print("CUDA: [dim]unknown (torch is not installed)[/dim]")
    elif cuda.get("error"):
        console.print(f"CUDA: [red]{escape(str(cuda['error']))}[/red]", soft_wrap=True)
    elif cuda["available"]:
        console.print(f"CUDA: [green]available[/green] (CUDA {escape(str(cuda['version']))}, "
                      f"torch {escape(str(cuda['torch_build']))})")
        console.print(table("GPUs", ["#", "name", "memory GiB", "capability", "bf16"],
                            [(g["index"], g["name"], g["memory_gib"], g["capability"], g["bf16"]) for g in report["gpus"]]))
    else:
        console.print(f"CUDA: [yellow]not available[/yellow] (torch {escape(str(cuda['torch_build']))}): "
                      "training runs on the CPU.")
    console.print(table("Backends", ["backend", "usable", "why not / install"],
                        [(b["name"], markup("[green]yes[/green]") if b["usable"] else markup("[red]no[/red]"),
                          "" if b["usable"] else f"{b['reason']}" + (f"\ninstall: {b['install_hint']}" if b["install_hint"] else ""))
                         for b in report["backends"]]))
    if report.get("unsloth_install"):
        from comapoi_cli.environment import unsloth_hint

        console.print(f"The unsloth backend is a plugin, not installed here. {escape(unsloth_hint())}",
                      soft_wrap=True, highlight=False)
    for p in report["plugin_errors"]:
        console.print(f"[red]Plugin {escape(p['name'])} failed:[/red] {escape(str(p['error']))}", soft_wrap=True)


app = App(rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False)
app.command("env")(env)

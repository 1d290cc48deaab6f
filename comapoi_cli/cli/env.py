"""``comapoi env``: the truth about this machine."""

from __future__ import annotations

import typer

from comapoi_cli.cli.render import console, print_json, table


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Show package versions, CUDA and GPUs, and which training backends are usable here (and why not)."""
    from comapoi_cli.environment import environment_report

    report = environment_report()
    if as_json:
        print_json(report)
        return
    console.print(f"Python {report['python']} on {report['platform']}")
    console.print(table("Packages", ["package", "version"],
                        [(k, v or "[dim]not installed[/dim]") for k, v in report["packages"].items()]))
    cuda = report["cuda"]
    if cuda is None:
        console.print("CUDA: [dim]unknown (torch is not installed)[/dim]")
    elif cuda.get("error"):
        console.print(f"CUDA: [red]{cuda['error']}[/red]")
    elif cuda["available"]:
        console.print(f"CUDA: [green]available[/green] (CUDA {cuda['version']}, torch {cuda['torch_build']})")
        console.print(table("GPUs", ["#", "name", "memory GiB", "capability", "bf16"],
                            [(g["index"], g["name"], g["memory_gib"], g["capability"], g["bf16"]) for g in report["gpus"]]))
    else:
        console.print(f"CUDA: [yellow]not available[/yellow] (torch {cuda['torch_build']}): training runs on the CPU.")
    console.print(table("Backends", ["backend", "usable", "why not / install"],
                        [(b["name"], "[green]yes[/green]" if b["usable"] else "[red]no[/red]",
                          "" if b["usable"] else f"{b['reason']}" + (f"\ninstall: {b['install_hint']}" if b["install_hint"] else ""))
                         for b in report["backends"]]))
    for p in report["plugin_errors"]:
        console.print(f"[red]Plugin {p['name']} failed:[/red] {p['error']}")


def register(app: typer.Typer) -> None:
    app.command("env")(env)

"""``comapoi train``: fine-tune one agent role (or all merged) with a registered backend.

The options are derived from the fields of ``comapoi_cli.training.job.TrainingJob`` (spellings,
help, panel, default: one source; see ``comapoi_cli.cli.fields``). Every flag of the original
``finetune_sft_new.py`` works in its original spelling (``--batch_size``) and in kebab-case
(``--batch-size``), as on every command. Flags default to None here so that only the flags actually
given override the config file (``--config``). This module only parses and renders: resolving the job,
the ``--dry-run`` report and the launch decision are ``comapoi_cli.training.service``'s. Nothing heavy
is imported before the job is resolved: ``--dry-run`` and ``--help`` stay fast.
"""

# No "from __future__ import annotations": Typer must see the option annotations, not strings.
import sys
from typing import Any, Optional

import typer

from comapoi_cli.cli.base import App
from comapoi_cli.cli.fields import options_from_fields, with_signature
from comapoi_cli.cli.render import err_console, print_json, success, warn
from comapoi_cli.plugins import Registry
from comapoi_cli.training.job import MODEL, OUTPUT, TrainingJob

HELP = """Fine-tune a LoRA / QLoRA adapter for one CoMaPOI agent role (or all roles merged).

Example: comapoi train --dataset nyc --type agent3 --model_path /models --model qwen2.5-7b-instruct --bf16
"""

#: Options of the command itself, not of the job.
COMMAND_OPTIONS = [
    ("unsloth", Optional[bool], typer.Option(None, "--unsloth", rich_help_panel=MODEL,
                                             help="Same as --backend unsloth (the original's flag).")),
    ("config", Optional[str], typer.Option(None, "--config", rich_help_panel=OUTPUT,
                                           help="A YAML or TOML file of these options (flags override it).")),
    ("dry_run", bool, typer.Option(False, "--dry-run", rich_help_panel=OUTPUT,
                                   help="Print the job as training resolves it, as JSON, and exit (loads no model).")),
    ("as_json", bool, typer.Option(False, "--json", rich_help_panel=OUTPUT,
                                   help="Print the result as JSON on standard output when the run ends.")),
]


def _explain_backend(name: str) -> "tuple[str, str] | None":
    if name.lower() != "unsloth":
        return None
    from comapoi_cli.environment import unsloth_hint

    return "The unsloth backend is a plugin, and it is not installed here.", unsloth_hint()


def command(registry: Registry) -> typer.Typer:
    """A one-command Typer app holding ``train``, its options derived from ``TrainingJob``."""
    import inspect

    roles = ", ".join(f"{r.id} ({r.display_name})" for r in registry.roles.values())
    params = options_from_fields(TrainingJob, choices={"registry:types": registry.training_types(),
                                                       "registry:backends": sorted(registry.backends)},
                                 help_values={"roles": roles}, explain={"registry:backends": _explain_backend})
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
               for name, annotation, default in COMMAND_OPTIONS]

    def train(**values: Any) -> None:
        run(registry, values)

    train.__doc__ = HELP
    app = App(rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False)
    app.command("train", context_settings={"help_option_names": ["-h", "--help"]})(with_signature(train, params))
    return app


def run(registry: Registry, values: dict[str, Any]) -> None:
    from comapoi_cli.training import service

    config, dry_run, as_json = values.pop("config"), values.pop("dry_run"), values.pop("as_json")
    given = {k: v for k, v in values.items() if v is not None and v != [] and v != ()}
    plan = service.plan_training(given, config_file=config, registry=registry, argv=sys.argv)
    if dry_run:
        print_json(service.dry_run_report(plan, registry))
        return
    service.check_trainable(plan)
    if plan.launch is not None:
        err_console.print(service.launch_summary(plan), markup=False, highlight=False, soft_wrap=True)
        code = service.run_launch(plan)
        if code:
            raise typer.Exit(code)
        return
    from comapoi_cli.training.distributed import is_main_process

    main = is_main_process()
    if main:
        err_console.print(service.start_summary(plan), markup=False, highlight=False, soft_wrap=True)
    from comapoi_cli.cli.reporting import ConsoleReporter

    result = service.run_training(plan, ConsoleReporter())
    if not main:
        # rank 0 reports, and its exit code is the run's. The other ranks end quietly with 0 even
        # when stopped: torch's launcher ends every rank as soon as one exits non-zero, which
        # could cut rank 0 short while it writes run.json after a Ctrl-C.
        return
    if as_json:
        print_json(service.result_dict(result))
    if result.status == "finished":
        message = service.finished_message(result, plan.job)
        if as_json:
            from rich.markup import escape

            err_console.print(f"[green]✓[/green] {escape(message)}", soft_wrap=True, highlight=False)
        else:
            success(message)
        return
    warn(service.stopped_message(result, sys.argv[1:]))
    raise typer.Exit(130)

"""``comapoi train --num-processes N`` / ``--accelerate-config FILE``: re-run the command under accelerate's launcher.

comapoi has no launcher of its own: ``plan_launch`` checks the request and builds the arguments of
``accelerate launch ... -m comapoi_cli train ...`` (the same command without the launch flags), and
``run_launcher`` runs accelerate's ``launch_command`` in this process. Each rank then runs the
ordinary training path (``distributed.py`` says which rank does what). Nothing here imports torch.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from comapoi_cli.errors import ComapoiError
from comapoi_cli.training.distributed import single_process_refusal, under_launcher, world_size

#: The flags that start the launcher; the processes it starts get every other flag unchanged.
LAUNCH_FLAGS = ("--num-processes", "--num_processes", "--accelerate-config", "--accelerate_config")
#: Set for the processes ``run_launcher`` starts: the launch flags they were started with (shell words),
#: so that the command printed to continue an interrupted run has them again.
LAUNCH_FLAGS_ENV = "COMAPOI_LAUNCH_FLAGS"


def split_launch_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without the launch flags and their values, and those flags with their values."""
    out, flags, skip = [], [], False
    for arg in argv:
        if skip:
            skip = False
            flags.append(arg)
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            flags.append(arg)
            continue
        out.append(arg)
    return out, flags


def child_args(argv: list[str]) -> list[str]:
    """``argv`` (from ``train`` on) without the launch flags and their values."""
    return split_launch_flags(argv)[0]


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: ``comapoi ARGV --resume``, with the launch flags it was started with.

    ``argv`` is this process's ``sys.argv[1:]``. Under a launcher comapoi did not start itself
    (``accelerate launch`` / ``torchrun``), the command is to be run under that launcher again.
    """
    import os
    import shlex

    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    flags = shlex.split(os.environ.get(LAUNCH_FLAGS_ENV, ""))
    command = shlex.join(["comapoi", *args, *flags, "--resume"])
    if under_launcher() and not flags:
        command += " (under the same accelerate launch / torchrun command)"
    return command


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_args(num_processes: int | None, accelerate_config: str | None, argv: list[str]) -> list[str]:
    """The ``accelerate launch`` arguments that run this ``comapoi train`` command in N processes.

    Without CUDA the processes train on the CPU through gloo: accelerate's ``--cpu`` would start a
    single process (its multi-CPU path needs MPI), so the torchrun path (``--multi_gpu``) is used
    there too, and comapoi asks accelerate for the CPU state itself (``distributed.state``).
    """
    if "train" not in argv:
        raise ComapoiError("--num-processes needs the command line of comapoi train (it re-runs it under accelerate launch).")
    child = child_args(argv[argv.index("train"):])
    args: list[str] = []
    if accelerate_config:
        args += ["--config_file", accelerate_config]
        if num_processes:
            args += ["--num_processes", str(num_processes)]
    else:
        args += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", str(free_port())]
        if num_processes and num_processes > 1:
            args.insert(0, "--multi_gpu")
    return [*args, "-m", "comapoi_cli", *child]


def plan_launch(num_processes: int | None, accelerate_config: str | None, backend: Any, argv: list[str]) -> list[str] | None:
    """The launcher arguments when this command must re-run under ``accelerate launch``, else None.

    Raises ``ComapoiError`` (one sentence) for a request that cannot work: a count below 1, a
    launch from inside a launcher, a missing config file, or more than one process for a backend
    that trains in one (``backend.multi_process`` False; also checked when an outside launcher
    started this process).
    """
    if num_processes is None and not accelerate_config:
        if world_size() > 1 and not backend.multi_process:
            raise single_process_refusal(backend.name, world_size())
        return None
    if num_processes is not None and num_processes < 1:
        raise ComapoiError(f"--num-processes must be at least 1, got {num_processes}.")
    if under_launcher():
        raise ComapoiError("--num-processes / --accelerate-config start a launcher, but this process was "
                           "already started by one (accelerate launch or torchrun).",
                           hint="Drop --num-processes and --accelerate-config, or run comapoi train directly.")
    if accelerate_config and not Path(accelerate_config).expanduser().is_file():
        raise ComapoiError(f"Accelerate config file {accelerate_config} does not exist.")
    if not backend.multi_process and (num_processes or 1) > 1:
        raise single_process_refusal(backend.name, num_processes or 1)
    if num_processes == 1 and not accelerate_config:
        return None  # one process: train here
    return launch_args(num_processes, accelerate_config, argv)


def run_launcher(args: list[str]) -> int:
    """Run accelerate's launcher (``accelerate launch ARGS``) here and return the exit code of its processes.

    A failed rank has already said why in one sentence; the launcher's own failure report (a long
    torch.distributed summary) is reduced to the exit code of the first process that failed.
    """
    import logging
    import os
    import shlex
    import subprocess
    import sys

    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates the loggers quieted below)
    from accelerate.commands.launch import launch_command, launch_command_parser

    # torch's elastic agent logs each signal it passes on ("Received 2 death signal, shutting down
    # workers"): the ranks report what happened themselves
    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    os.environ[LAUNCH_FLAGS_ENV] = shlex.join(split_launch_flags(sys.argv[1:])[1])
    try:
        launch_command(launch_command_parser().parse_args(args))
    except subprocess.CalledProcessError as exc:  # a one-process launch
        return exc.returncode or 1
    except Exception as exc:
        failure = getattr(exc, "get_first_failure", None)
        if failure is None:
            if type(exc).__name__ == "SignalException":  # Ctrl-C / SIGTERM reached the launcher
                return 130
            raise
        code = failure()[1].exitcode
        return code if isinstance(code, int) and code > 0 else 1
    return 0

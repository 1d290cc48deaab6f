"""Training backends: what runs a training job (vanilla TRL, Unsloth, ...).

The built-in TRL backend is in ``comapoi_cli/default_plugins/trl_backend.py``; plugins add more
through the ``register_backends`` hook (the Unsloth backend lives in ``plugins/comapoi-unsloth``).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from comapoi_cli.reporting import Reporter
    from comapoi_cli.training.job import TrainingJob


class Backend:
    """Base class of a training backend. Subclass it and set the attributes.

    Attributes:
        name: the value of ``--backend``, e.g. ``"trl"``.
        description: one line for ``comapoi plugins list``.
        requires: human-readable needs, e.g. ``("trl>=1.15", "a CUDA GPU")``.
        install_hint: what to run to make it usable, shown with the reason when it is not.
        multi_process: whether it can run under ``accelerate launch`` / ``torchrun`` with more than one process.
        memory_profile: how ``--fit`` estimates its memory: a key of
            ``comapoi_cli.training.fit.MEMORY_PROFILES`` (``trl``, the default, or ``unsloth``).
        methods: the ``--method`` values it trains (``sft``, ``grpo``, ``dpo``); default ``("sft",)``.
    """

    name: str = ""
    description: str = ""
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    multi_process: bool = True
    memory_profile: str = "trl"
    methods: tuple[str, ...] = ("sft",)

    def unusable_reason(self) -> str | None:
        """Return None if this backend can train on this machine now, else one sentence saying why not.

        Called by ``comapoi env``, ``comapoi plugins list`` and before training; keep it cheap
        (``importlib.util.find_spec`` before any heavy import).
        """
        return None

    def train(self, job: "TrainingJob", reporter: "Reporter | None" = None) -> Any:
        """Run ``job`` and return its ``TrainingResult``; say what happens through ``reporter``.

        Raise ``comapoi_cli.errors.ComapoiError`` for user errors. A backend that does not reuse the
        TRL path (``comapoi_cli.training.trl_trainer.TRLTrainingPath``) writes the run folder itself and
        returns a ``comapoi_cli.training.job.TrainingResult`` (see docs/plugins.md).
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        reason = unusable_reason(self)
        return {
            "name": self.name,
            "description": self.description,
            "requires": list(self.requires),
            "usable": reason is None,
            "reason": reason,
            "install_hint": self.install_hint if reason else None,
            "multi_process": self.multi_process,
            "memory_profile": self.memory_profile,
            "methods": list(getattr(self, "methods", ("sft",))),
        }


def unusable_reason(backend: Backend) -> str | None:
    """``backend.unusable_reason()``, where a check that itself fails (plugin code raising, even
    ``SystemExit``) is the reason instead of an error: a broken backend never breaks a command."""
    try:
        reason = backend.unusable_reason()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        from comapoi_cli.errors import first_line

        text = first_line(exc, default="")
        return f"its usability check failed ({type(exc).__name__}{': ' + text if text else ''})"
    return None if reason is None else str(reason)


def method_problem(backend: Backend, method: str, backends: dict[str, Backend]) -> str | None:
    """None when ``backend`` trains ``--method method``, else one sentence naming the backends that do."""
    if method in tuple(getattr(backend, "methods", ("sft",))):
        return None
    able = sorted(name for name, other in backends.items() if method in tuple(getattr(other, "methods", ("sft",))))
    where = (f"use --backend {' or '.join(able)}" if able else "no installed backend trains it")
    return f"--backend {backend.name} does not train --method {method}: {where}."


def missing_packages(*names: str) -> list[str]:
    """The import names among ``names`` that cannot be imported here (checked without importing them)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None (reads metadata only; imports nothing)."""
    from importlib import metadata  # here, not at import: importing it costs about 0.1 s of every start

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None

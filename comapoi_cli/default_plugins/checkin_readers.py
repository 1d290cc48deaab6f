"""The built-in raw check-in formats of ``comapoi data prepare --from``: tsmc2014, gowalla, getnext, comapoi.

The readers live in ``comapoi_cli.data.checkins.readers`` (imported only when a command asks for
them: pyarrow stays out of ``comapoi --help``).
"""

from __future__ import annotations

from comapoi_cli.hookspecs import hookimpl


@hookimpl
def register_checkin_readers(register):
    from comapoi_cli.data.checkins.readers import BUILT_IN

    for reader in BUILT_IN:
        register(reader)

"""Raw public check-ins -> CoMaPOI's plain next-POI trajectories (``comapoi data prepare``).

``readers`` holds the format plugins' base class and the built-in formats, ``table`` the columnar
check-in table they return, ``service`` the steps (filters, sessions, split, ids, windows) and
the atomic writing of ``{data}/{name}/``. docs/data.md describes the command.
"""

from __future__ import annotations

from comapoi_cli.checkins import CheckinReader, CheckinTable, ReadOptions, Reject
from comapoi_cli.data.checkins.readers import checkin_reader, checkin_readers
from comapoi_cli.data.checkins.service import PrepareResult, PrepareSettings, parse_bbox, parse_split, prepare_checkins

__all__ = ["CheckinReader", "CheckinTable", "PrepareResult", "PrepareSettings", "ReadOptions", "Reject",
           "checkin_reader", "checkin_readers", "parse_bbox", "parse_split", "prepare_checkins"]

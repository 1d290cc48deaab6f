"""Check-in readers: the ``--from FORMAT`` of ``comapoi data prepare``.

A reader is registered through the ``register_checkin_readers`` hook (built in:
``comapoi_cli.default_plugins.checkin_readers``: tsmc2014, gowalla, getnext, comapoi). It turns
raw files into one :class:`~comapoi_cli.checkins.CheckinTable`. The delimited formats
are parsed by pyarrow's CSV reader (C++, columnar) and checked with pyarrow compute functions:
no Python loop runs per row, except over the rows that are rejected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from comapoi_cli.checkins import CheckinReader, CheckinTable, ReadOptions, Reject, arrow
from comapoi_cli.errors import DataError, UsageError, first_line

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

_NUMBER = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_INTEGER = r"^\s*[+-]?\d+\s*$"


# -- reading delimited files -------------------------------------------------------------------------
def _utf8_valid(data: bytes) -> bool:
    import numpy as np
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64).tobytes())
    try:
        pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)]).cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _bad_utf8_lines(data: bytes) -> dict[int, bytes]:
    """The lines (1-based) of ``data`` that are not UTF-8 (only called on a file that is not)."""
    bad: dict[int, bytes] = {}
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad[number] = line.rstrip(b"\r")
    return bad


def read_delimited(path: Path, file_index: int, ncols: int, *, delimiter: str, header: bool, quote: bool,
                   encoding: str, table: CheckinTable) -> tuple[dict[str, Any], Any]:
    """Read ``path`` into string columns (``c0``.. or the header's names) and their 1-based line numbers.

    Rows with another number of columns and lines that are not valid in the file's encoding are
    added to ``table.rejects``; the rest come back as strings for the format's own checks.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        data = path.read_bytes()
    except OSError as exc:
        from comapoi_cli.fileio import fs_error

        raise fs_error(exc, path, "read") from None
    name = str(path)
    bad_utf8: dict[int, bytes] = {}
    if encoding in ("auto", "utf-8"):
        if _utf8_valid(data):
            used = "utf-8"
        elif encoding == "auto":
            used = "latin-1"
            table.notes.append(f"{path.name} is not UTF-8: read as Latin-1")
        else:
            used = "utf-8"
            bad_utf8 = _bad_utf8_lines(data)
            lines = data.split(b"\n")
            for number in bad_utf8:
                lines[number - 1] = b""
            data = b"\n".join(lines)
    elif encoding in ("latin-1", "latin1", "iso-8859-1"):
        used = "latin-1"
    else:
        raise UsageError(f"--encoding must be auto, utf-8 or latin-1, not '{encoding}'.")
    table.encodings[name] = used
    for number, raw in bad_utf8.items():
        table.rejects.append(Reject(name, number, "invalid_utf8", "not valid UTF-8",
                                    raw.decode("utf-8", errors="replace"), raw))

    skipped: list[int] = []

    def invalid(row: Any) -> str:
        if row.number not in bad_utf8:
            skipped.append(row.number)
            if row.actual_columns == 1 and not (row.text or "").strip():
                table.rejects.append(Reject(name, row.number, "blank_line", "an empty line", row.text or ""))
            else:
                table.rejects.append(Reject(name, row.number, "columns",
                                            f"{row.actual_columns} columns, expected {row.expected_columns}",
                                            row.text or ""))
        return "skip"

    names = None if header else [f"c{i}" for i in range(ncols)]
    read_options = pacsv.ReadOptions(use_threads=False, column_names=names, encoding=used if used != "utf-8" else "utf8",
                                     block_size=1 << 24)
    parse_options = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quote else False,
                                       ignore_empty_lines=False, newlines_in_values=False, invalid_row_handler=invalid)
    try:
        if header:
            head = pacsv.read_csv(pa.py_buffer(data.split(b"\n", 1)[0] + b"\n"),
                                  read_options=pacsv.ReadOptions(encoding=read_options.encoding),
                                  parse_options=pacsv.ParseOptions(delimiter=delimiter))
            columns = head.column_names
        else:
            columns = names or []
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False,
                                       quoted_strings_can_be_null=False)
        # First on every core: if no row is malformed (the usual case) that is the result; pyarrow tells
        # a malformed row's line number only when it reads on one thread, so then it reads again that way.
        malformed: list[int] = []

        def count(row: Any) -> str:
            malformed.append(1)
            return "skip"

        threaded = pacsv.ReadOptions(use_threads=True, column_names=names, encoding=read_options.encoding,
                                     block_size=1 << 24)
        parsed = pacsv.read_csv(pa.py_buffer(data), read_options=threaded, convert_options=convert,
                                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quote else False,
                                                                 ignore_empty_lines=False, newlines_in_values=False,
                                                                 invalid_row_handler=count))
        if malformed:
            del parsed
            parsed = pacsv.read_csv(pa.py_buffer(data), read_options=read_options, parse_options=parse_options,
                                    convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise DataError(f"Cannot read {path} as a {'CSV' if delimiter == ',' else 'tab-separated'} file: "
                        f"{first_line(exc)}.") from None
    rows = parsed.num_rows
    first = 2 if header else 1
    total = rows + len(skipped)
    numbers = np.arange(first, first + total, dtype=np.int64)
    if skipped:
        numbers = np.setdiff1d(numbers, np.asarray(skipped, dtype=np.int64), assume_unique=True)
    table.lines_read += total
    cols = {c: parsed.column(c) for c in parsed.column_names}  # chunked: no copy
    if bad_utf8:  # their emptied lines came back as rows: drop them (already rejected)
        keep = ~np.isin(numbers, np.fromiter(bad_utf8, dtype=np.int64))
        mask = arrow(keep)
        cols = {c: v.filter(mask) for c, v in cols.items()}
        numbers = numbers[keep]
    return cols, numbers


def check_rows(table: CheckinTable, name: str, file_index: int, raw: dict[str, Any], numbers: Any, *,
               delimiter: str, user: Any, poi: Any, category: Any, lat: Any, lon: Any, utc: Any, offset: Any,
               session: Any = None) -> dict[str, Any]:
    """Check a file's converted columns, reject the rows that fail (first failing check), return the rest.

    ``utc`` is a timestamp array with nulls where the text did not parse; ``lat``/``lon``/``offset``
    are string arrays (checked and converted here); ``offset`` may be an int array already.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(user)
    reasons = np.zeros(n, dtype=np.int8)  # 0 = good

    def lengths(column: Any) -> Any:
        return np.asarray(pc.binary_length(column).to_numpy(), dtype=np.int64)

    def numbers_of(column: Any, kind: Any, pattern: str) -> tuple[Any, Any]:
        """The column as numbers and a mask of the texts that are not numbers (the cast is tried first:
        the regular expression runs only on a column that holds a bad value)."""
        try:
            values = pc.cast(column, kind)
            return values, np.zeros(n, dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok = pc.match_substring_regex(column, pattern)
            values = pc.cast(pc.if_else(ok, pc.utf8_trim_whitespace(column), "0"), kind)
            return values, ~np.asarray(ok.to_numpy(), dtype=bool)

    checks: list[tuple[str, str, Any]] = []
    total = np.zeros(n, dtype=np.int64)
    for column in raw.values():
        total += lengths(column)
    checks.append(("blank_line", "an empty line", total == 0))
    checks.append(("empty_field", "an empty user, POI or category",
                   (lengths(user) == 0) | (lengths(poi) == 0) | (lengths(category) == 0)))
    lat_f, lat_bad = numbers_of(lat, pa.float64(), _NUMBER)
    lon_f, lon_bad = numbers_of(lon, pa.float64(), _NUMBER)
    lat_np, lon_np = np.asarray(lat_f.to_numpy()), np.asarray(lon_f.to_numpy())
    with np.errstate(invalid="ignore"):
        coords_bad = lat_bad | lon_bad | ~(np.abs(lat_np) <= 90.0) | ~(np.abs(lon_np) <= 180.0)
    checks.append(("bad_coordinates", "latitude or longitude is not a number in range", coords_bad))
    checks.append(("bad_time", "the time does not parse", np.asarray(pc.is_null(utc).to_numpy(), dtype=bool)))
    if pa.types.is_string(offset.type) or pa.types.is_large_string(offset.type):
        off_i, off_bad = numbers_of(offset, pa.int64(), _INTEGER)
        off_np = np.asarray(off_i.to_numpy())
        checks.append(("bad_offset", "the timezone offset is not a whole number of minutes within a day",
                       off_bad | (np.abs(off_np) > 1440)))
        offset = off_i
    for code, (_, _, flags) in enumerate(checks, 1):
        reasons[(reasons == 0) & flags] = code
    bad = np.nonzero(reasons)[0]
    if len(bad):
        text = pc.binary_join_element_wise(*[c.take(arrow(bad.astype(np.int64))) for c in raw.values()], delimiter).to_pylist()
        for i, row in enumerate(bad.tolist()):
            reason, detail, _ = checks[reasons[row] - 1]
            table.rejects.append(Reject(name, int(numbers[row]), reason, detail, text[i] or ""))
    good = arrow(reasons == 0)

    def kept(column: Any) -> Any:
        return column.filter(good) if len(bad) else column  # no copy when every row is good (the usual case)

    out = {
        "user": kept(user),
        "poi": kept(poi),
        "category": kept(category),
        "lat": kept(lat_f),
        "lon": kept(lon_f),
        "utc": kept(pc.cast(utc, pa.int64())),
        "offset": kept(pc.cast(offset, pa.int32())),
        "file": arrow(np.full(int(np.count_nonzero(reasons == 0)), file_index, dtype=np.int32)),
        "line": arrow(numbers[reasons == 0]) if len(bad) else arrow(numbers),
    }
    if session is not None:
        out["session"] = kept(session)
    return out


def concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    import pyarrow as pa

    if not parts:
        return {}
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    def chunks(array: Any) -> list[Any]:
        return list(array.chunks) if isinstance(array, pa.ChunkedArray) else [array]

    return {k: pa.chunked_array([c.cast(parts[0][k].type) for p in parts for c in chunks(p[k])], parts[0][k].type)
            for k in keys}


def _offset_array(n: int, minutes: int) -> Any:
    import numpy as np

    return arrow(np.full(n, minutes, dtype=np.int32))


# -- the built-in formats ---------------------------------------------------------------------------
class Tsmc2014Reader(CheckinReader):
    name = "tsmc2014"
    description = ("Foursquare NYC/TKY (dataset_TSMC2014_*.txt): tab-separated, no header, 8 columns; UTC time "
                   "'Tue Apr 03 18:00:09 +0000 2012' and an offset in minutes; Latin-1 files are detected.")

    def read(self, paths: Sequence[Path], options: ReadOptions) -> CheckinTable:
        import pyarrow.compute as pc

        table = CheckinTable({})
        parts = []
        for index, path in enumerate(paths):
            raw, numbers = read_delimited(path, index, 8, delimiter="\t", header=False, quote=False,
                                          encoding=options.encoding, table=table)
            utc = pc.strptime(pc.utf8_trim_whitespace(raw["c7"]), format="%a %b %d %H:%M:%S %z %Y", unit="s",
                              error_is_null=True)
            parts.append(check_rows(table, str(path), index, raw, numbers, delimiter="\t", user=raw["c0"],
                                    poi=raw["c1"], category=raw["c3"], lat=raw["c4"], lon=raw["c5"], utc=utc,
                                    offset=raw["c6"]))
        table.columns = concat(parts)
        return table


class GowallaReader(CheckinReader):
    name = "gowalla"
    description = ("Gowalla (loc-gowalla_totalCheckins.txt): tab-separated, no header, 5 columns: user, "
                   "2010-10-19T23:55:27Z, latitude, longitude, location; categories from --spots.")

    def read(self, paths: Sequence[Path], options: ReadOptions) -> CheckinTable:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        table = CheckinTable({})
        parts = []
        for index, path in enumerate(paths):
            raw, numbers = read_delimited(path, index, 5, delimiter="\t", header=False, quote=False,
                                          encoding=options.encoding, table=table)
            utc = pc.strptime(pc.utf8_trim_whitespace(raw["c1"]), format="%Y-%m-%dT%H:%M:%SZ", unit="s",
                              error_is_null=True)
            n = len(raw["c0"])
            category = pa.DictionaryArray.from_arrays(arrow(np.zeros(n, dtype=np.int32)),
                                                      pa.array([options.default_category])).cast(pa.string())
            parts.append(check_rows(table, str(path), index, raw, numbers, delimiter="\t", user=raw["c0"],
                                    poi=raw["c4"], category=category, lat=raw["c2"], lon=raw["c3"], utc=utc,
                                    offset=_offset_array(n, options.utc_offset or 0)))
        table.columns = concat(parts)
        if options.spots is not None and table.rows:
            table.columns["category"] = _spot_categories(options.spots, table.columns["poi"], options.default_category,
                                                         table)
        elif table.rows:
            table.notes.append(f"no --spots file: every POI's category is '{options.default_category}'")
        return table


_SPOT_NAME = r"""['"]name['"]:\s*['"](?P<name>[^'"]*)['"]"""


def _spot_categories(path: Path, pois: Any, default: str, table: CheckinTable) -> Any:
    """Categories of Gowalla spots from a spots CSV: an ``id`` column and a ``spot_categories`` column
    (``[{'url': '/categories/34', 'name': 'Coffee Shop'}]``, the first name is taken) or ``category``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    try:
        spots = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
                               parse_options=pacsv.ParseOptions(newlines_in_values=True))
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"Cannot read the spots file {path}: {first_line(exc)}.") from None
    names = {c.lower(): c for c in spots.column_names}
    id_col = next((names[c] for c in ("id", "spot_id", "location_id", "location") if c in names), None)
    if id_col is None:
        raise DataError(f"The spots file {path} has no id column (id, spot_id or location_id).")
    ids = pc.cast(spots.column(id_col), pa.string())
    if "category" in names:
        cats = pc.cast(spots.column(names["category"]), pa.string())
    elif "spot_categories" in names:
        text = pc.cast(spots.column(names["spot_categories"]), pa.string())
        cats = pc.struct_field(pc.extract_regex(text, _SPOT_NAME), [0])
    else:
        raise DataError(f"The spots file {path} has no category column (category or spot_categories).")
    cats = pc.fill_null(cats, default)
    table.encodings[str(path)] = "utf-8"
    where = pc.index_in(pois, value_set=ids.combine_chunks() if hasattr(ids, "combine_chunks") else ids)
    found_cats = pc.take(cats, where)
    missing = pc.sum(pc.is_null(found_cats)).as_py()
    if missing:
        table.notes.append(f"{missing} check-in(s) at locations missing from {path.name}: category '{default}'")
    return pc.fill_null(found_cats, default).combine_chunks() if hasattr(found_cats, "combine_chunks") else pc.fill_null(found_cats, default)


class GetNextReader(CheckinReader):
    name = "getnext"
    description = ("The CSVs GETNext and LLM4POI publish (NYC_train.csv, ...): a header with user_id, POI_id, "
                   "POI_catname, latitude, longitude, timezone, UTC_time and trajectory_id (its sessions).")

    REQUIRED = ("user_id", "POI_id", "POI_catname", "latitude", "longitude", "timezone", "UTC_time")

    def read(self, paths: Sequence[Path], options: ReadOptions) -> CheckinTable:
        import pyarrow.compute as pc

        table = CheckinTable({})
        parts = []
        for index, path in enumerate(paths):
            raw, numbers = read_delimited(path, index, 0, delimiter=",", header=True, quote=True,
                                          encoding=options.encoding, table=table)
            missing = [c for c in self.REQUIRED if c not in raw]
            if missing:
                raise DataError(f"{path} is not a GETNext CSV: it has no column {', '.join(missing)}.")
            utc = pc.strptime(pc.utf8_trim_whitespace(raw["UTC_time"]), format="%Y-%m-%d %H:%M:%S%z", unit="s",
                              error_is_null=True)
            session = raw.get("trajectory_id")
            parts.append(check_rows(table, str(path), index, raw, numbers, delimiter=",", user=raw["user_id"],
                                    poi=raw["POI_id"], category=raw["POI_catname"], lat=raw["latitude"],
                                    lon=raw["longitude"], utc=utc, offset=raw["timezone"], session=session))
        table.columns = concat(parts)
        return table


_HEADER = re.compile(r"<historical trajectory of user_(\d+)_subtrajectory_(\d+)>")
_CHECKIN = re.compile(r"At (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}), [A-Za-z]+, user (\d+) visit POI ID (\d+) "
                      r"\((.*?), (-?\d+\.?\d*),(-?\d+\.?\d*)\)\.")


class ComapoiReader(CheckinReader):
    name = "comapoi"
    description = ("CoMaPOI's plain next-POI JSONL ({ds}_train.jsonl, {ds}_test.jsonl): the check-ins of every "
                   "prompt (local times, ids kept), each once; re-split per user by time.")

    def read(self, paths: Sequence[Path], options: ReadOptions) -> CheckinTable:
        """One pass per line (these files are small); the labels carry no time and are not check-ins."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        table = CheckinTable({}, keep_ids=True)
        users: list[str] = []
        pois: list[str] = []
        cats: list[str] = []
        lats: list[str] = []
        lons: list[str] = []
        times: list[str] = []
        files: list[int] = []
        lines: list[int] = []
        seen: set[tuple[str, str, str]] = set()
        duplicates = 0
        for index, path in enumerate(paths):
            try:
                data = path.read_bytes()
            except OSError as exc:
                from comapoi_cli.fileio import fs_error

                raise fs_error(exc, path, "read") from None
            table.encodings[str(path)] = "utf-8"
            for number, raw in enumerate(data.splitlines(), 1):
                table.lines_read += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    table.rejects.append(Reject(str(path), number, "invalid_utf8", "not valid UTF-8",
                                                raw.decode("utf-8", errors="replace"), raw))
                    continue
                if not text.strip():
                    table.rejects.append(Reject(str(path), number, "blank_line", "an empty line", text))
                    continue
                try:
                    record = json.loads(text)
                    prompt = next(m["content"] for m in record["messages"] if m.get("role") == "user")
                except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
                    table.rejects.append(Reject(str(path), number, "bad_record",
                                                "not a CoMaPOI conversation with a user turn", text))
                    continue
                found = _CHECKIN.findall(prompt) if isinstance(prompt, str) else []
                if not found or not _HEADER.search(prompt):
                    table.rejects.append(Reject(str(path), number, "no_checkins",
                                                "the user turn holds no CoMaPOI check-ins", text))
                    continue
                for when, user, poi, cat, lat, lon in found:
                    key = (user, when, poi)
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                    users.append(user)
                    pois.append(poi)
                    cats.append(cat)
                    lats.append(lat)
                    lons.append(lon)
                    times.append(when)
                    files.append(index)
                    lines.append(number)
        if duplicates:
            table.notes.append(f"{duplicates} check-in(s) repeated in several trajectories were read once")
        utc = pc.strptime(pa.array(times, pa.string()), format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
        table.columns = {
            "user": pa.array(users, pa.string()), "poi": pa.array(pois, pa.string()),
            "category": pa.array(cats, pa.string()),
            "lat": arrow(np.asarray(lats, dtype=np.float64)), "lon": arrow(np.asarray(lons, dtype=np.float64)),
            "utc": pc.cast(pc.cast(utc, pa.timestamp("s")), pa.int64()),
            "offset": _offset_array(len(users), 0),
            "file": arrow(np.asarray(files, dtype=np.int32)), "line": arrow(np.asarray(lines, dtype=np.int64)),
        }
        table.notes.append("comapoi trajectories carry local times: no offset is applied")
        return table


BUILT_IN = (Tsmc2014Reader(), GowallaReader(), GetNextReader(), ComapoiReader())


def checkin_readers(registry: Registry) -> dict[str, CheckinReader]:
    """The readers the plugins registered (``register_checkin_readers``), by name."""
    return dict(registry.readers)


def checkin_reader(registry: Registry, name: str) -> CheckinReader:
    return registry.reader(name)

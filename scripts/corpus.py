#!/usr/bin/env python3
"""Load a loghub-style corpus of real logs as loupelive records.

A corpus directory holds ``*_structured.csv`` files, one per system, as the
loghub authors parsed them (https://github.com/logpai/loghub).  Their column
sets differ per system, so every file's header row is read and the columns are
mapped by *name* (case-insensitively), never by file name:

==========================================  ======================================
column                                      becomes
==========================================  ======================================
``Level`` (or ``Severity``)                 ``Record.level`` (see :func:`parse_level`)
``Component`` (or ``Logger``)               ``Record.logger``
``Pid`` / ``Process`` (else ``Thread``,     ``Record.thread``
``Tid``)
``Content`` (or ``Message``)                ``Record.message``
``Date``, ``Time``, ``Day``, ``Month``,     ``Record.timestamp`` (epoch seconds, UTC)
``Year``, ``Timestamp``
``LineId``, ``EventId``, ``EventTemplate``  dropped (parser output, not log data)
anything else                               ``Record.fields[column]`` (a string)
==========================================  ======================================

Timestamps: the time columns of a row are parsed in this order: ``Time`` alone
when it is a whole date and time (Apache's ``Sun Dec 04 04:47:44 2005``, BGL's
``2005-06-03-15.42.50.675872``, an epoch number, ISO 8601, …); else the date
parts of ``Date`` / ``Day`` / ``Month`` / ``Year`` (``081109``, ``2015-10-18``,
``2005.06.03``, ``17/06/09``, ``03-17``, ``Dec`` + ``10``, …) with the time of
day in ``Time`` (``203615``, ``18:01:47,978``, ``00:00:00.008``, …); else a
``Timestamp`` column.  A date without a year gets the year of the previous row
(2000 at first) and a new year when the month jumps back (Dec → Jan).  A row
whose time does not parse gets the previous row's timestamp plus 1 ms (a
steadily increasing clock), and its raw time columns are kept as fields so
nothing is lost.  Likewise a ``Level`` value that is not a level name (Linux's
``Level`` column holds a host name) maps to INFO and is kept as a field.

``python scripts/corpus.py [DIR]`` prints how each file was mapped.
"""

from __future__ import annotations

import argparse
import calendar
import collections
import csv
import datetime as dt
import functools
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import attrs

from loupelive import Level, Record
from loupelive.demo import demo_records

__all__ = [
    "FileReport",
    "default_corpus_dir",
    "load_corpus",
    "load_corpus_with_reports",
    "parse_level",
    "synthetic_records",
]

#: Columns the loghub parser added; they are not part of the log.
DROPPED_COLUMNS: Final = frozenset({"lineid", "eventid", "eventtemplate"})
LEVEL_COLUMNS: Final = ("level", "severity")
LOGGER_COLUMNS: Final = ("component", "logger")
THREAD_COLUMNS: Final = ("pid", "process", "thread", "tid")
MESSAGE_COLUMNS: Final = ("content", "message", "msg")
TIME_COLUMNS: Final = frozenset({"date", "time", "day", "month", "year", "timestamp"})

#: Step of the fallback clock for a row whose time does not parse.
FALLBACK_STEP: Final = 0.001
#: Where the fallback clock starts if the first rows do not parse (2000-01-01 UTC).
FALLBACK_BASE: Final = 946_684_800.0
#: Year given to dates that have none, until a row says otherwise (a leap year,
#: so that ``Feb 29`` parses).
DEFAULT_YEAR: Final = 2000

_SUFFIX: Final = "_structured.csv"

_LEVEL_NAMES: Final[dict[str, Level]] = {
    # syslog / Apache
    "emerg": Level.CRITICAL,
    "emergency": Level.CRITICAL,
    "alert": Level.CRITICAL,
    "crit": Level.CRITICAL,
    "critical": Level.CRITICAL,
    "fatal": Level.CRITICAL,
    "panic": Level.CRITICAL,
    "failure": Level.ERROR,
    "severe": Level.ERROR,
    "err": Level.ERROR,
    "error": Level.ERROR,
    "warn": Level.WARNING,
    "warning": Level.WARNING,
    "notice": Level.INFO,
    "info": Level.INFO,
    "information": Level.INFO,
    "informational": Level.INFO,
    "unknown": Level.INFO,
    "debug": Level.DEBUG,
    "trace": Level.DEBUG,
    "verbose": Level.DEBUG,
    "fine": Level.DEBUG,
    "finer": Level.DEBUG,
    "finest": Level.DEBUG,
    # Android's one-letter levels
    "v": Level.DEBUG,
    "d": Level.DEBUG,
    "i": Level.INFO,
    "w": Level.WARNING,
    "e": Level.ERROR,
    "f": Level.CRITICAL,
    "a": Level.CRITICAL,
}


def parse_level(text: str) -> Level | None:
    """A level for ``text`` (``notice`` → INFO, ``warn`` → WARNING, ``fatal`` → CRITICAL, …).

    Returns ``None`` for text that is not a level at all; callers map it to INFO.
    """
    name = text.strip().lower()
    if name in _LEVEL_NAMES:
        return _LEVEL_NAMES[name]
    try:
        return Level.parse(name)
    except ValueError:
        return None


# -- timestamps ---------------------------------------------------------------------

_MONTHS: Final[dict[str, int]] = {
    **{name.lower(): number for number, name in enumerate(calendar.month_abbr) if name},
    **{name.lower(): number for number, name in enumerate(calendar.month_name) if name},
    "sept": 9,
}

_TIME_OF_DAY: Final = re.compile(r"\[?(\d{1,2}):(\d{2})(?::(\d{2}))?(?:[.,:](\d{1,9}))?\]?")
_COMPACT_TIME: Final = re.compile(r"(\d{2})(\d{2})(\d{2})(?:[.,](\d{1,9}))?")
_EPOCH: Final = re.compile(r"\d{9,13}(?:\.\d+)?")

_DATE_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"(\d{4})[-./](\d{1,2})[-./](\d{1,2})"), "ymd"),
    (re.compile(r"(\d{1,2})[-./](\d{1,2})[-./](\d{4})"), "mdy"),
    (re.compile(r"(\d{2})[-./](\d{2})[-./](\d{2})"), "ymd"),  # log4j's yy/MM/dd
    (re.compile(r"(\d{4})(\d{2})(\d{2})"), "ymd"),
    (re.compile(r"(\d{2})(\d{2})(\d{2})"), "ymd"),  # yyMMdd
    (re.compile(r"(\d{1,2})[-/](\d{1,2})"), "md"),  # Android's MM-dd
    (re.compile(r"(\d{1,2})[- ]([A-Za-z]{3,9})\.?[- ,]+(\d{4})"), "dMy"),
    (re.compile(r"([A-Za-z]{3,9})\.?[- ](\d{1,2}),?[- ](\d{4})"), "Mdy"),
)

#: Whole date-and-time formats tried on a ``Time`` (or ``Timestamp``) value.
#: ``True``: the format has no year (the row gets the carried year).
_DATETIME_FORMATS: Final[tuple[tuple[str, bool], ...]] = (
    ("%a %b %d %H:%M:%S %Y", False),  # Apache error log, ctime
    ("%a %b %d %H:%M:%S.%f %Y", False),
    ("%d/%b/%Y:%H:%M:%S %z", False),  # common access log
    ("%Y-%m-%d-%H.%M.%S.%f", False),  # BGL
    ("%Y%m%d-%H:%M:%S:%f", False),  # HealthApp
    ("%Y%m%d-%H:%M:%S", False),
    ("%Y/%m/%d %H:%M:%S", False),
    ("%Y.%m.%d %H:%M:%S", False),
    ("%y/%m/%d %H:%M:%S", False),
    ("%m/%d/%Y %H:%M:%S", False),
    ("%d.%m.%Y %H:%M:%S", False),
    ("%b %d %Y %H:%M:%S", False),
    ("%b %d %H:%M:%S %Y", False),
    ("%b %d %H:%M:%S", True),  # syslog
    ("%m.%d %H:%M:%S", True),  # Proxifier
    ("%m-%d %H:%M:%S.%f", True),
    ("%m-%d %H:%M:%S", True),
)


def _year(text: str) -> int:
    value = int(text)
    if len(text) <= 2:
        return value + (2000 if value < 70 else 1900)
    return value


def _month(text: str) -> int | None:
    token = text.strip().rstrip(".").lower()
    if token.isdigit():
        value = int(token)
        return value if 1 <= value <= 12 else None
    return _MONTHS.get(token)


def _day(text: str) -> int | None:
    token = text.strip()
    if token.isdigit() and 1 <= int(token) <= 31:
        return int(token)
    return None


@functools.lru_cache(maxsize=4096)
def _parse_date(text: str) -> tuple[int | None, int | None, int | None]:
    """(year, month, day) from a ``Date`` value; parts it does not give are ``None``."""
    token = text.strip()
    if not token:
        return None, None, None
    month = _month(token)
    if month is not None and not token.isdigit():
        return None, month, None  # OpenSSH: Date is "Dec", the day is in Day
    if token.isdigit() and len(token) <= 2:
        return None, None, _day(token)  # Linux/Mac: Date is the day, Month the month
    for pattern, order in _DATE_PATTERNS:
        match = pattern.fullmatch(token)
        if match is None:
            continue
        parts = match.groups()
        if order == "ymd":
            return _year(parts[0]), int(parts[1]), int(parts[2])
        if order == "mdy":
            first, second = int(parts[0]), int(parts[1])
            if first > 12:  # day first
                first, second = second, first
            return _year(parts[2]), first, second
        if order == "md":
            return None, int(parts[0]), int(parts[1])
        if order == "dMy":
            return _year(parts[2]), _month(parts[1]), int(parts[0])
        if order == "Mdy":
            return _year(parts[2]), _month(parts[0]), int(parts[1])
    return None, None, None


def _parse_time_of_day(text: str) -> float | None:
    """Seconds since midnight from ``06:55:46``, ``18:01:47,978``, ``203615``, …"""
    token = text.strip()
    match = _TIME_OF_DAY.fullmatch(token) or _COMPACT_TIME.fullmatch(token)
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    value = int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
    if int(hours) > 23 or int(minutes) > 59 or int(seconds or 0) > 60:
        return None
    if fraction:
        value += int(fraction) / 10 ** len(fraction)
    return float(value)


def _parse_datetime(text: str) -> tuple[float, bool] | None:
    """(epoch seconds, has no year) from a whole date and time, or ``None``."""
    token = text.strip().strip("[]")
    if not token:
        return None
    if _EPOCH.fullmatch(token):
        value = float(token)
        if len(token.split(".")[0]) == 13:
            value /= 1000  # milliseconds
        return value, False
    if any(c.isdigit() for c in token) and ("-" in token or "T" in token):
        try:
            parsed = dt.datetime.fromisoformat(token.replace(",", "."))
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            return parsed.timestamp(), False
    for fmt, yearless in _DATETIME_FORMATS:
        try:
            parsed = dt.datetime.strptime(token, fmt)
        except ValueError:
            continue
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp(), yearless
    return None


class _Clock:
    """Turns one file's time columns into timestamps, row by row."""

    def __init__(self, columns: dict[str, str]) -> None:
        # columns: lower-case role ("date", "time", …) -> the header's spelling
        self.columns = columns
        self.year = DEFAULT_YEAR
        self.last_month: int | None = None
        self.last: float | None = None
        self.parsed = 0
        self.fallbacks = 0

    def _with_year(self, month: int | None) -> int:
        """The carried year, moved on when the month jumps back (Dec → Jan)."""
        if month is not None and self.last_month is not None and month < self.last_month - 6:
            self.year += 1
        if month is not None:
            self.last_month = month
        return self.year

    def _yearless(self, value: float) -> float:
        # strptime gave year 1900: move the result into the carried year.
        stamp = dt.datetime.fromtimestamp(value, dt.UTC)
        year = self._with_year(stamp.month)
        try:
            return stamp.replace(year=year).timestamp()
        except ValueError:  # Feb 29 in a year without one
            return stamp.replace(year=year, day=28).timestamp()

    def _from_parts(self, row: dict[str, str]) -> float | None:
        year: int | None = None
        month: int | None = None
        day: int | None = None
        if "date" in self.columns:
            year, month, day = _parse_date(row.get(self.columns["date"]) or "")
        if "year" in self.columns and year is None:
            text = (row.get(self.columns["year"]) or "").strip()
            year = _year(text) if text.isdigit() else None
        if "month" in self.columns and month is None:
            month = _month(row.get(self.columns["month"]) or "")
        if "day" in self.columns and day is None:
            day = _day(row.get(self.columns["day"]) or "")
        seconds: float | None = 0.0
        if "time" in self.columns:
            seconds = _parse_time_of_day(row.get(self.columns["time"]) or "")
        if seconds is None or month is None or day is None:
            return None
        if year is None:
            year = self._with_year(month)
        else:
            self.year = year
            self.last_month = month
        try:
            midnight = dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp()
        except ValueError:
            return None
        return midnight + seconds

    def _parse(self, row: dict[str, str]) -> float | None:
        if "time" in self.columns:
            text = row.get(self.columns["time"]) or ""
            if _parse_time_of_day(text) is None:
                whole = _parse_datetime(text)
                if whole is not None:
                    value, yearless = whole
                    return self._yearless(value) if yearless else value
        from_parts = self._from_parts(row)
        if from_parts is not None:
            return from_parts
        if "timestamp" in self.columns:
            whole = _parse_datetime(row.get(self.columns["timestamp"]) or "")
            if whole is not None:
                return self._yearless(whole[0]) if whole[1] else whole[0]
        return None

    def timestamp(self, row: dict[str, str]) -> tuple[float, bool]:
        """(timestamp, parsed); unparsed rows continue the clock by 1 ms."""
        value = self._parse(row) if self.columns else None
        if value is None:
            self.fallbacks += 1
            value = FALLBACK_BASE if self.last is None else self.last + FALLBACK_STEP
            self.last = value
            return value, False
        self.parsed += 1
        self.last = value
        return value, True


# -- files ----------------------------------------------------------------------------


@attrs.define
class FileReport:
    """How one CSV file was read (for ``python scripts/corpus.py``)."""

    system: str
    path: str
    rows: int = 0
    level_column: str | None = None
    logger_column: str | None = None
    thread_column: str | None = None
    message_column: str | None = None
    time_columns: list[str] = attrs.Factory(list)
    field_columns: list[str] = attrs.Factory(list)
    timestamps_parsed: int = 0
    timestamps_fallback: int = 0
    levels: dict[str, int] = attrs.Factory(dict)
    unknown_levels: int = 0


def _first(header: dict[str, str], names: Iterable[str]) -> str | None:
    for name in names:
        if name in header:
            return header[name]
    return None


def system_name(path: Path) -> str:
    """``HDFS_2k.log_structured.csv`` → ``HDFS_2k``."""
    name = path.name
    if name.endswith(_SUFFIX):
        name = name[: -len(_SUFFIX)]
    if name.endswith(".log"):
        name = name[: -len(".log")]
    return name or path.stem


def load_file(path: Path, system: str | None = None) -> tuple[list[Record], FileReport]:
    """The records of one structured CSV file and how it was mapped."""
    report = FileReport(system=system or system_name(path), path=str(path))
    records: list[Record] = []
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as file:
        reader = csv.DictReader(file)
        names = [n for n in (reader.fieldnames or []) if n]
        header = {n.strip().lower(): n for n in names}
        level_col = _first(header, LEVEL_COLUMNS)
        logger_col = _first(header, LOGGER_COLUMNS)
        thread_col = _first(header, THREAD_COLUMNS)
        message_col = _first(header, MESSAGE_COLUMNS)
        time_cols = {key: name for key, name in header.items() if key in TIME_COLUMNS}
        mapped = {level_col, logger_col, thread_col, message_col, *time_cols.values()}
        field_cols = [n for n in names if n not in mapped and n.strip().lower() not in DROPPED_COLUMNS]
        report.level_column, report.logger_column = level_col, logger_col
        report.thread_column, report.message_column = thread_col, message_col
        report.time_columns = list(time_cols.values())
        report.field_columns = field_cols
        clock = _Clock(time_cols)
        levels: collections.Counter[str] = collections.Counter()
        for row in reader:
            fields = {name: row.get(name) or "" for name in field_cols}
            level = Level.INFO
            if level_col is not None:
                raw_level = row.get(level_col) or ""
                parsed_level = parse_level(raw_level)
                if parsed_level is None:
                    report.unknown_levels += 1
                    fields[level_col] = raw_level
                else:
                    level = parsed_level
            timestamp, ok = clock.timestamp(row)
            if not ok:
                for name in time_cols.values():
                    fields[name] = row.get(name) or ""
            levels[level.name] += 1
            records.append(
                Record(
                    seq=len(records) + 1,
                    timestamp=timestamp,
                    level=level,
                    logger=(row.get(logger_col) or "") if logger_col else "",
                    thread=(row.get(thread_col) or "") if thread_col else "",
                    message=(row.get(message_col) or "") if message_col else "",
                    fields=fields,
                )
            )
        report.rows = len(records)
        report.timestamps_parsed = clock.parsed
        report.timestamps_fallback = clock.fallbacks
        report.levels = dict(levels)
    return records, report


def load_corpus_with_reports(directory: str | Path) -> tuple[dict[str, list[Record]], list[FileReport]]:
    """Like :func:`load_corpus`, with a report per file."""
    paths = sorted(Path(directory).glob(f"*{_SUFFIX}"))
    corpus: dict[str, list[Record]] = {}
    reports: list[FileReport] = []
    for path in paths:
        name = system_name(path)
        if name in corpus:  # two files that shorten to the same name
            name = path.name[: -len(_SUFFIX)] if path.name.endswith(_SUFFIX) else path.name
        records, report = load_file(path, name)
        corpus[name] = records
        reports.append(report)
    return corpus, reports


def load_corpus(directory: str | Path) -> dict[str, list[Record]]:
    """One list of records per ``*_structured.csv`` file in ``directory`` (sorted by name).

    Seqs count from 1 in each list.  An empty dict if there are no such files.
    """
    return load_corpus_with_reports(directory)[0]


def default_corpus_dir() -> Path | None:
    """``../shared/corpus/loghub`` next to the repository, if it exists."""
    root = Path(__file__).resolve().parent.parent
    candidate = (root / ".." / "shared" / "corpus" / "loghub").resolve()
    return candidate if candidate.is_dir() else None


def synthetic_records(n: int, seed: int = 0) -> list[Record]:
    """``n`` demo records (loupelive.demo's web shop), for when there is no corpus."""
    rng = random.Random(seed)
    records: list[Record] = []
    timestamp = 1_700_000_000.0
    for seq, (level, logger, thread, message, exception, fields) in enumerate(demo_records(rng), 1):
        if seq > n:
            break
        timestamp += rng.expovariate(20.0)
        records.append(
            Record(
                seq=seq,
                timestamp=timestamp,
                level=level,
                logger=logger,
                thread=thread,
                message=message,
                exception=exception,
                fields=fields,
            )
        )
    return records


def corpus_or_synthetic(
    directory: str | Path | None, *, synthetic: int = 2000, seed: int = 0
) -> tuple[dict[str, list[Record]], str]:
    """The corpus in ``directory`` (or the default one), else synthetic records.

    Returns the records per system and a description of where they came from.
    """
    path = Path(directory) if directory is not None else default_corpus_dir()
    if path is not None:
        corpus = load_corpus(path)
        if corpus:
            return corpus, str(path)
        if directory is not None:
            raise SystemExit(f"no *{_SUFFIX} files in {path}")
    return {"synthetic": synthetic_records(synthetic, seed)}, f"synthetic (loupelive.demo, seed {seed})"


def _print_reports(reports: Sequence[FileReport], corpus: dict[str, list[Record]]) -> None:
    for report in reports:
        records = corpus[report.system]
        print(f"{report.system}: {report.rows} records from {report.path}")
        print(
            f"  level={report.level_column} logger={report.logger_column} "
            f"thread={report.thread_column} message={report.message_column}"
        )
        print(f"  time columns={report.time_columns} fields={report.field_columns}")
        print(
            f"  timestamps parsed {report.timestamps_parsed}, fallback {report.timestamps_fallback}; "
            f"levels {report.levels}; unknown level values {report.unknown_levels}"
        )
        if records:
            first = dt.datetime.fromtimestamp(records[0].timestamp, dt.UTC)
            last = dt.datetime.fromtimestamp(records[-1].timestamp, dt.UTC)
            print(f"  first {first.isoformat()}  last {last.isoformat()}")
            print(f"  e.g. {records[0]!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "directory", nargs="?", help="corpus directory (default: ../shared/corpus/loghub if it exists)"
    )
    args = parser.parse_args(argv)
    directory = args.directory or default_corpus_dir()
    if directory is None:
        print("no corpus directory given and no default corpus found", file=sys.stderr)
        return 2
    corpus, reports = load_corpus_with_reports(directory)
    if not reports:
        print(f"no *{_SUFFIX} files in {directory}", file=sys.stderr)
        return 1
    _print_reports(reports, corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())

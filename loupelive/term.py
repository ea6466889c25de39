"""The terminal faces of the viewer: ``tail`` over one or many sessions, and the
session table of ``sessions`` (plain, JSON, or redrawn in place with ``--watch``).

Plain ANSI escapes, no terminal library: colour is a handful of SGR codes and
redrawing a table is "cursor home, clear below" — not worth a dependency.
Colour is used only on a terminal and never when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

import attrs
import trio

from .errors import ErrorCode, HandshakeRejected
from .messages import SessionAdded, SessionChanged, SessionCounts, SessionEnded, SessionInfo
from .records import Gap, Level, Record
from .viewer import Viewer

__all__ = [
    "RateMeter",
    "TailOptions",
    "TailPrinter",
    "app_matcher",
    "follow_sessions",
    "session_table",
    "use_colour",
    "watch_sessions",
]

log = logging.getLogger("loupelive.cli")

RESET: Final = "\x1b[0m"
LEVEL_COLOURS: Final = {
    Level.DEBUG: "\x1b[2m",
    Level.INFO: "",
    Level.WARNING: "\x1b[33m",
    Level.ERROR: "\x1b[31m",
    Level.CRITICAL: "\x1b[1;31m",
}
#: Session labels cycle through these (picked by a hash of the session id, so
#: a session keeps its colour across runs).
LABEL_COLOURS: Final = (
    "\x1b[36m",
    "\x1b[35m",
    "\x1b[32m",
    "\x1b[34m",
    "\x1b[96m",
    "\x1b[95m",
    "\x1b[92m",
    "\x1b[94m",
)
#: Cursor home and clear to the end of the screen: redraw in place.
REDRAW: Final = "\x1b[H\x1b[J"
#: How often ``sessions --watch`` redraws on a terminal (seconds).
WATCH_REDRAW_INTERVAL: Final = 1.0


def fmt_time(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def short_id(session_id: str) -> str:
    return session_id[:8]


# -- tail -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TailOptions:
    format: str = "text"
    colour: bool = False
    #: Client-side filter on message, logger, thread, exception and fields.
    grep: re.Pattern[str] | None = None
    #: Show record times minus the session's measured clock offset.
    corrected_time: bool = False
    #: Prefix each line with a session label (following several sessions).
    labels: bool = False


class TailPrinter:
    """Writes records, gaps and session events, as text lines or JSON lines."""

    def __init__(self, out: TextIO, options: TailOptions, viewer: Viewer) -> None:
        self.out = out
        self.options = options
        self.viewer = viewer

    def _label(self, session_id: str, app: str) -> str:
        if not self.options.labels:
            return ""
        text = f"{app or '?'}:{short_id(session_id)}"
        if self.options.colour:
            colour = LABEL_COLOURS[zlib.crc32(session_id.encode()) % len(LABEL_COLOURS)]
            text = f"{colour}{text}{RESET}"
        return text + " "

    def _offset(self, session_id: str) -> float:
        info = self.viewer.session(session_id)
        return (info.clock_offset or 0.0) if info is not None else 0.0

    def _write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def matches(self, record: Record) -> bool:
        pattern = self.options.grep
        if pattern is None:
            return True
        if pattern.search(record.message) or pattern.search(record.logger) or pattern.search(record.thread):
            return True
        if record.exception and pattern.search(record.exception):
            return True
        return any(pattern.search(f"{k}={v}") for k, v in record.fields.items())

    def record(self, info: SessionInfo, record: Record) -> None:
        if not self.matches(record):
            return
        offset = self._offset(info.session_id) if self.options.corrected_time else 0.0
        if self.options.format == "json":
            obj: dict[str, Any] = {"type": "record", "session_id": info.session_id, **record.to_json()}
            if self.options.corrected_time:
                obj["corrected_timestamp"] = round(record.timestamp - offset, 6)
            self._write(json.dumps(obj))
            return
        stamp = datetime.datetime.fromtimestamp(record.timestamp - offset).strftime("%H:%M:%S.%f")[:-3]
        parts = [stamp, f"{record.level.name:<8}"]
        if record.logger:
            parts.append(record.logger)
        if record.thread:
            parts.append(f"[{record.thread}]")
        line = " ".join(parts) + " " + record.message
        if record.fields:
            line += "  " + " ".join(f"{k}={v}" for k, v in record.fields.items())
        if record.exception:
            line += "\n" + "\n".join("    " + x for x in record.exception.splitlines())
        if self.options.colour and LEVEL_COLOURS[record.level]:
            line = LEVEL_COLOURS[record.level] + line + RESET
        self._write(self._label(info.session_id, info.app) + line)

    def gap(self, info: SessionInfo, gap: Gap) -> None:
        if self.options.format == "json":
            self._write(json.dumps({"type": "gap", "session_id": info.session_id, **attrs.asdict(gap)}))
            return
        count = gap.last_seq - gap.first_seq + 1
        text = f"--- {count} record(s) not shown: seq {gap.first_seq}-{gap.last_seq} ({gap.reason}) ---"
        if self.options.colour:
            text = f"\x1b[7m{text}{RESET}"
        self._write(self._label(info.session_id, info.app) + text)

    def status(self, info: SessionInfo, old: str) -> None:
        """A session's status changed (disconnected, running again)."""
        if self.options.format == "json":
            self._write(
                json.dumps(
                    {
                        "type": "session_status",
                        "session_id": info.session_id,
                        "status": info.status,
                        "was": old,
                    }
                )
            )
            return
        text = (
            "--- agent disconnected; waiting for it to come back ---"
            if info.status == "disconnected"
            else f"--- agent back ({info.status}) ---"
        )
        if not self.options.labels:
            # One session: stdout carries only its records; news go to stderr.
            log.warning("session %s: %s", info.session_id, text.strip("- "))
            return
        self._write(self._label(info.session_id, info.app) + text)

    def ended(self, info: SessionInfo, reason: str, status: str) -> None:
        if self.options.format == "json":
            self._write(
                json.dumps(
                    {
                        "type": "session_ended",
                        "session_id": info.session_id,
                        "reason": reason,
                        "status": status,
                    }
                )
            )
            return
        if not self.options.labels:
            log.warning("session %s %s (%s)", info.session_id, status, reason)
            return
        text = f"--- session {info.session_id} {status} ({reason}) ---"
        if self.options.colour and status == "crashed":
            text = f"\x1b[1;31m{text}{RESET}"
        self._write(self._label(info.session_id, info.app) + text)


def app_matcher(pattern: str | None) -> Callable[[SessionInfo], bool]:
    """Select sessions by app glob (``None``: every session)."""
    if pattern is None:
        return lambda info: True
    return lambda info: fnmatch.fnmatchcase(info.app, pattern)


async def follow_sessions(
    viewer: Viewer,
    printer: TailPrinter,
    *,
    select: Callable[[SessionInfo], bool],
    history: int,
    min_level: int,
    after_seq: int | None = None,
    only: str | None = None,
) -> None:
    """Print the streams of every session ``select`` accepts, now and as they come.

    With ``only`` (a session id), follow that session and return when it ends.
    Otherwise run until cancelled.  Status changes (disconnected, back) and
    ends are printed inline.
    """
    events = viewer.session_events()
    statuses: dict[str, str] = {}
    followed: set[str] = set()
    done = trio.Event()

    async def follow(info: SessionInfo) -> None:
        session_id = info.session_id
        status = "ended"
        reason = "closed"
        try:
            async with viewer.open_stream(
                session_id, history=history, min_level=min_level, after_seq=after_seq
            ) as stream:
                async for item in stream:
                    if isinstance(item, Record):
                        printer.record(info, item)
                    else:
                        printer.gap(info, item)
                code = stream.end_code
                reason = code.value if code else "closed"
                if code is ErrorCode.AGENT_LOST:
                    status = "crashed"
        except HandshakeRejected as exc:
            if only is not None or exc.code is not ErrorCode.UNKNOWN_SESSION:
                raise
            reason = "session_ended"  # it ended before we could join
        printer.ended(info, reason, status)
        if session_id == only:
            done.set()

    async with trio.open_nursery() as nursery:

        def start(info: SessionInfo) -> None:
            if info.session_id in followed:
                return
            if (only is not None and info.session_id != only) or (only is None and not select(info)):
                return
            followed.add(info.session_id)
            statuses[info.session_id] = info.status
            nursery.start_soon(follow, info)

        async def watch_events() -> None:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, SessionAdded):
                        start(event.session)
                    elif isinstance(event, SessionChanged):
                        info = event.session
                        old = statuses.get(info.session_id)
                        if old is not None and old != info.status:
                            statuses[info.session_id] = info.status
                            printer.status(info, old)
                        elif old is None:
                            start(info)

        for info in viewer.sessions():
            start(info)
        nursery.start_soon(watch_events)
        if only is not None:
            await done.wait()
            nursery.cancel_scope.cancel()


# -- sessions ----------------------------------------------------------------------------

TABLE_HEADER: Final = (
    "SESSION",
    "APP",
    "VERSION",
    "ENV",
    "HOST",
    "PID",
    "USER",
    "STARTED",
    "STATUS",
    "RECORDS",
    "ERRORS",
    "WARNINGS",
    "REC/S",
    "VIEWERS",
    "STREAMING",
)


def session_table(
    sessions: Sequence[SessionInfo], *, colour: bool = False, rates: dict[str, float] | None = None
) -> str:
    """The session list as an aligned text table.

    Sessions with errors (ERROR or CRITICAL records) are marked: in red on a
    terminal, and with ``!`` after their error count everywhere.
    """
    rows: list[tuple[str, ...]] = [TABLE_HEADER]
    flagged: list[bool] = [False]
    for s in sorted(sessions, key=lambda s: (s.app, s.started_at)):
        errors = s.errors + s.critical
        rate = (rates or {}).get(s.session_id)
        rows.append(
            (
                s.session_id,
                s.app or "-",
                s.app_version or "-",
                s.environment or "-",
                s.host or "-",
                str(s.pid),
                s.user or "-",
                fmt_time(s.started_at),
                s.status,
                str(s.records),
                f"{errors}!" if errors else "0",
                str(s.warnings),
                "-" if rate is None else f"{rate:.1f}",
                str(s.viewers),
                "yes" if s.streaming else "no",
            )
        )
        flagged.append(errors > 0 or s.status == "crashed")
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for row, flag in zip(rows, flagged, strict=True):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        if colour and flag:
            line = f"\x1b[31m{line}{RESET}"
        lines.append(line)
    return "\n".join(lines)


class RateMeter:
    """Records per second per session, from successive ``records`` counters."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self.rates: dict[str, float] = {}

    def update(self, sessions: Sequence[SessionInfo]) -> None:
        now = trio.current_time()
        seen = set()
        for s in sessions:
            seen.add(s.session_id)
            last = self._last.get(s.session_id)
            if last is not None and now > last[0]:
                self.rates[s.session_id] = max(0.0, (s.records - last[1]) / (now - last[0]))
            self._last[s.session_id] = (now, s.records)
        for gone in set(self._last) - seen:
            del self._last[gone]
            self.rates.pop(gone, None)


async def watch_sessions(viewer: Viewer, out: TextIO, *, fmt: str, terminal: bool, colour: bool) -> None:
    """``sessions --watch``: redraw the table in place on a terminal; otherwise
    print one line per change (text) or one JSON object per event (json)."""
    events = viewer.session_events()
    if terminal and fmt == "text":
        meter = RateMeter()
        async with contextlib.aclosing(events):
            while True:
                sessions = viewer.sessions()
                meter.update(sessions)
                table = (
                    session_table(sessions, colour=colour, rates=meter.rates)
                    if sessions
                    else "no live sessions"
                )
                out.write(
                    REDRAW
                    + f"loupelive sessions — {viewer.host}:{viewer.port} — {len(sessions)} live — "
                    + datetime.datetime.now().strftime("%H:%M:%S")
                    + "\n\n"
                    + table
                    + "\n"
                )
                out.flush()
                await trio.sleep(WATCH_REDRAW_INTERVAL)
    async with contextlib.aclosing(events):
        async for event in events:
            if fmt == "json":
                if isinstance(event, SessionEnded):
                    obj: dict[str, Any] = {
                        "type": "ended",
                        "session_id": event.session_id,
                        "reason": event.reason,
                        "status": event.status,
                    }
                elif isinstance(event, SessionCounts):
                    obj = {"type": "counts", "counts": [entry.to_json() for entry in event.counts]}
                else:
                    kind = "added" if isinstance(event, SessionAdded) else "changed"
                    obj = {"type": kind, "session": event.session.to_json()}
                _print(out, json.dumps(obj))
            elif isinstance(event, SessionEnded):
                _print(out, f"- {event.status:<8} {event.session_id} ({event.reason})")
            elif isinstance(event, SessionCounts):
                for entry in event.counts:
                    c = entry.counts
                    _print(
                        out,
                        f"# counts   {entry.session_id} records={c.records} errors={c.errors + c.critical} "
                        f"warnings={c.warnings}",
                    )
            else:
                s = event.session
                sign = "+ added  " if isinstance(event, SessionAdded) else "~ changed"
                _print(
                    out,
                    f"{sign} {s.session_id} app={s.app} host={s.host} pid={s.pid} status={s.status} "
                    f"records={s.records} errors={s.errors + s.critical} viewers={s.viewers} "
                    f"streaming={'yes' if s.streaming else 'no'}",
                )


def _print(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def use_colour(out: TextIO = sys.stdout) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ

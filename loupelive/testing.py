"""Helpers for Trio-based test harnesses: an in-process relay and log capture.

Importable without pytest (the fixtures live in ``loupelive.pytest_plugin``)::

    async with loupelive.testing.open_relay() as relay:
        env = {**os.environ, **relay.env()}          # for subprocesses using LiveHandler.from_env
        async with loupelive.testing.open_capture(relay, app="service") as capture:
            process = await nursery.start(partial(trio.run_process, cmd, env=env))
            await capture.wait_for("ready")           # deadline: the caller's cancel scope
            ...
            capture.assert_no(level=loupelive.Level.ERROR)

A capture given a relay handle reaches it over in-memory streams, so under
``trio.testing.MockClock(autojump_threshold=0)`` the relay's and the capture's
timers run in virtual time.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import trio

from .config import RelayConfig
from .connection import Connector
from .errors import ConnectionClosed, HandshakeRejected
from .messages import SessionAdded, SessionChanged, SessionInfo
from .records import Level, Record
from .relay import Relay, RelayStatistics, serve_relay
from .viewer import Viewer, open_viewer

__all__ = ["Capture", "TestRelay", "open_capture", "open_relay"]

#: History asked for per captured session: every record the agent still holds.
CAPTURE_HISTORY: Final = 1_000_000

#: Relay settings for tests: quick to end sessions and streams, loopback only.
TEST_DEFAULTS: Final[dict[str, Any]] = {
    "host": "127.0.0.1",
    "agent_port": 0,
    "viewer_port": 0,
    "stream_grace": 0.0,
    "agent_grace": 0.0,
    "end_flush_timeout": 5.0,
    "shutdown_grace": 0.0,
}

Matcher = str | re.Pattern[str] | Callable[[Record], bool]


@attrs.define(eq=False)
class TestRelay:
    """A relay running in the current Trio run (see :func:`open_relay`)."""

    __test__ = False  # not a pytest test class

    relay: Relay
    #: The CA file clients should trust when the relay uses TLS (see env()).
    ca_file: str | None = None

    @property
    def agent_port(self) -> int:
        return self.relay.agent_port

    @property
    def viewer_port(self) -> int:
        return self.relay.viewer_port

    @property
    def config(self) -> RelayConfig:
        return self.relay.config

    def statistics(self, *, detail: bool = False) -> RelayStatistics:
        return self.relay.statistics(detail=detail)

    def memory_connector(self, port: str) -> Connector:
        return self.relay.memory_connector(port)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """Environment variables that make ``LiveHandler.from_env`` connect here."""
        env = {"LOUPELIVE_RELAY": f"{self.config.host}:{self.agent_port}"}
        token = self.relay._agent_token
        if token:
            env["LOUPELIVE_AGENT_TOKEN"] = token
        ca_file = self.ca_file or self.config.tls_cert
        if ca_file:
            env["LOUPELIVE_CA"] = os.path.abspath(ca_file)
        return env


@contextlib.asynccontextmanager
async def open_relay(*, ca_file: str | None = None, **overrides: Any) -> AsyncIterator[TestRelay]:
    """A relay on 127.0.0.1 with ephemeral ports and test-friendly settings.

    Keyword arguments override :class:`~loupelive.RelayConfig` options.
    ``ca_file`` is the CA that issued ``tls_cert`` (what ``env()`` tells
    clients to trust); without it, a self-signed ``tls_cert`` is trusted as is.
    """
    config = RelayConfig(**{**TEST_DEFAULTS, **overrides})
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, config)
        try:
            yield TestRelay(relay, ca_file=ca_file)
        finally:
            nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class _Entry:
    session: SessionInfo
    record: Record


class Capture:
    """The records of matching sessions, collected as they arrive (see :func:`open_capture`)."""

    def __init__(self, *, app: str | None, session_id: str | None) -> None:
        self.app = app
        self.session_id = session_id
        self._entries: list[_Entry] = []
        self._changed = trio.Event()
        self._watched: set[str] = set()
        self.gaps: list[tuple[SessionInfo, Any]] = []

    @property
    def records(self) -> list[Record]:
        """Every captured record, in arrival order (seq order within a session)."""
        return [entry.record for entry in self._entries]

    def _matches_session(self, info: SessionInfo) -> bool:
        return (self.app is None or info.app == self.app) and (
            self.session_id is None or info.session_id == self.session_id
        )

    def _add(self, session: SessionInfo, record: Record) -> None:
        self._entries.append(_Entry(session, record))
        self._changed.set()
        self._changed = trio.Event()

    @staticmethod
    def _match(record: Record, matcher: Matcher) -> bool:
        if isinstance(matcher, str):
            return matcher in record.message
        if isinstance(matcher, re.Pattern):
            return matcher.search(record.message) is not None
        return bool(matcher(record))

    def _select(
        self, entries: list[_Entry], matcher: Matcher | None, level: Level | int | None, app: str | None
    ) -> list[_Entry]:
        return [
            entry
            for entry in entries
            if (level is None or entry.record.level >= level)
            and (app is None or entry.session.app == app)
            and (matcher is None or self._match(entry.record, matcher))
        ]

    async def wait_for(
        self, matcher: Matcher, *, level: Level | int | None = None, app: str | None = None
    ) -> Record:
        """Wait for a record whose message contains ``matcher`` (a string), matches
        it (a compiled regex), or satisfies it (a predicate); return it.

        Records already captured count.  ``level`` is a minimum level.  There is
        no timeout here: put a ``trio.fail_after`` around the call.
        """
        seen = 0
        while True:
            found = self._select(self._entries[seen:], matcher, level, app)
            if found:
                return found[0].record
            seen = len(self._entries)
            await self._changed.wait()

    def assert_no(
        self, matcher: Matcher | None = None, *, level: Level | int = Level.ERROR, app: str | None = None
    ) -> None:
        """Fail if any captured record at or above ``level`` (and matching) exists.

        Raises:
          AssertionError: naming the offending records.
        """
        found = self._select(self._entries, matcher, level, app)
        if found:
            lines = "\n".join(self._format(entry) for entry in found)
            raise AssertionError(
                f"{len(found)} unexpected record(s) at {Level.from_number(level).name} or above:\n{lines}"
            )

    @staticmethod
    def _format(entry: _Entry) -> str:
        record = entry.record
        stamp = datetime.datetime.fromtimestamp(record.timestamp).strftime("%H:%M:%S.%f")[:-3]
        line = f"[{entry.session.app or entry.session.session_id[:8]}] {stamp} {record.level.name:<8} {record.logger}: {record.message}"
        if record.exception:
            line += "\n" + "\n".join("    " + x for x in record.exception.splitlines())
        return line

    def dump(self) -> str:
        """Every captured record, one readable line each (for failure messages)."""
        if not self._entries:
            return "(no records captured)"
        return "\n".join(self._format(entry) for entry in self._entries)

    async def _follow(self, viewer: Viewer, info: SessionInfo) -> None:
        try:
            async with viewer.open_stream(info.session_id, history=CAPTURE_HISTORY) as stream:
                async for item in stream:
                    if isinstance(item, Record):
                        self._add(info, item)
                    else:
                        self.gaps.append((info, item))
        except (HandshakeRejected, ConnectionClosed):
            pass  # the session ended before or while we watched it

    async def _run(self, viewer: Viewer, nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        events = viewer.session_events()
        for info in viewer.sessions():
            self._watch(viewer, nursery, info)
        task_status.started()
        async for event in events:
            if isinstance(event, (SessionAdded, SessionChanged)):
                self._watch(viewer, nursery, event.session)

    def _watch(self, viewer: Viewer, nursery: trio.Nursery, info: SessionInfo) -> None:
        if info.session_id in self._watched or not self._matches_session(info):
            return
        self._watched.add(info.session_id)
        nursery.start_soon(self._follow, viewer, info)


@contextlib.asynccontextmanager
async def open_capture(
    relay_or_address: TestRelay | Relay | str | tuple[str, int],
    *,
    app: str | None = None,
    session_id: str | None = None,
    token: str | None = None,
    tls: bool | ssl.SSLContext = False,
    ca_file: str | None = None,
) -> AsyncIterator[Capture]:
    """Collect the records of matching sessions, present and future, from their
    first record on (the agents' history included).

    Args:
      relay_or_address: a relay from :func:`open_relay` or :func:`serve_relay`
        (reached over in-memory streams), or a viewer address ``"host:port"``.
      app, session_id: which sessions to capture (default: all).
      token: the viewer token, for an address.
      tls, ca_file: TLS for an address (as for ``open_viewer``).  A relay
        handle with TLS is reached over in-memory streams inside this process,
        so its certificate is not checked there.
    """
    capture = Capture(app=app, session_id=session_id)
    if isinstance(relay_or_address, (TestRelay, Relay)):
        relay = relay_or_address.relay if isinstance(relay_or_address, TestRelay) else relay_or_address
        in_process: bool | ssl.SSLContext = False
        if relay.config.tls:
            # The bytes never leave this process: TLS is only spoken because
            # the relay insists on it.
            in_process = ssl.create_default_context()
            in_process.check_hostname = False
            in_process.verify_mode = ssl.CERT_NONE
        viewer_cm = open_viewer(
            connector=relay.memory_connector("viewer"),
            token=token or relay._viewer_token,
            tls=in_process,
        )
    else:
        if isinstance(relay_or_address, str):
            host, _, port = relay_or_address.rpartition(":")
            address = (host or "127.0.0.1", int(port))
        else:
            address = relay_or_address
        viewer_cm = open_viewer(address[0], address[1], token=token, tls=tls, ca_file=ca_file)
    async with viewer_cm as viewer, trio.open_nursery() as nursery:
        await nursery.start(capture._run, viewer, nursery)
        try:
            yield capture
        finally:
            nursery.cancel_scope.cancel()

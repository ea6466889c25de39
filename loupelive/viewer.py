"""The viewer: the session list with live updates, and session streams.

Theory of operation
-------------------
:func:`open_viewer` opens the viewer control connection and waits for the
relay's snapshot (one SESSION_ADDED per live session, then SNAPSHOT_END) before
yielding, so :meth:`Viewer.sessions` is complete from the start.  A reader task
then applies SESSION_ADDED / SESSION_CHANGED / SESSION_ENDED to the snapshot and
hands each to every :meth:`Viewer.session_events` iterator through its own
bounded channel.

:meth:`Viewer.open_stream` opens a dedicated data connection for one session.
Its iterator decodes batches (with a hard cap on inflated bytes), drops records
below the stream's own minimum level (the agent sends the lowest level any viewer
asked for), and checks continuity: every batch must start right after the last
seq covered, or a GAP must say why not.  A hole that nobody explained is still
reported, as a :class:`Gap` with reason ``missing``: a loss is never silent.
"""

from __future__ import annotations

import collections
import contextlib
import math
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Final

import trio

from . import __version__
from ._util import collapse_groups
from .config import DEFAULT_VIEWER_PORT
from .connection import Connection, Connector, connect
from .errors import ConnectionClosed, ErrorCode, LoupeError, RemoteProtocolError, SessionNotFound
from .messages import (
    GapNotice,
    Hello,
    Role,
    SessionAdded,
    SessionChanged,
    SessionEnded,
    SessionInfo,
    SnapshotEnd,
    StreamEnd,
    decode_message,
)
from .records import BatchDecoder, Gap, Level, Record
from .wire import MAX_DATA_PAYLOAD, FrameKind

__all__ = ["SessionEvent", "SessionEvents", "Stream", "Viewer", "open_viewer"]

SessionEvent = SessionAdded | SessionChanged | SessionEnded

#: Session events buffered per ``session_events()`` iterator.  A consumer that
#: falls this far behind gets an error and should re-read ``sessions()``.
MAX_EVENT_BACKLOG: Final = 10_000

GAP_MISSING: Final = "missing"


class Stream:
    """One session's records, as an async iterator of :class:`Record` and :class:`Gap`.

    Made by :meth:`Viewer.open_stream`.  Iteration ends when the session ends
    (``end_code`` then says how: ``session_ended``, ``agent_lost``, …); a stream
    the relay cut off (e.g. ``slow_consumer``) raises :class:`ConnectionClosed`.
    """

    def __init__(
        self, conn: Connection, info: SessionInfo | None, min_level: Level | int, *, silence: float
    ) -> None:
        self._conn = conn
        self._silence = silence
        self.session = info
        self.min_level = int(min_level)
        self._decoder = BatchDecoder()
        self._ready: collections.deque[Record | Gap] = collections.deque()
        self._last_seq: int | None = None
        self.end_code: ErrorCode | None = None
        self.end_reason = ""
        self.records_received = 0
        self.gaps_received = 0

    @property
    def last_seq(self) -> int | None:
        """The last seq covered so far (records or gaps)."""
        return self._last_seq

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Record | Gap:
        while not self._ready:
            if self.end_code is not None:
                raise StopAsyncIteration
            await self._fill()
        return self._ready.popleft()

    def _cover(self, first: int, last: int) -> None:
        """Account for a range about to be delivered; report any hole before it."""
        if self._last_seq is not None and first > self._last_seq + 1:
            self._ready.append(Gap(self._last_seq + 1, first - 1, GAP_MISSING))
            self.gaps_received += 1
        if self._last_seq is None or last > self._last_seq:
            self._last_seq = last

    async def _fill(self) -> None:
        # Liveness is checked only while the application is reading: a slow
        # consumer is the relay's business (it skips or drops it), not a
        # reason to think the relay is gone.  The relay heartbeats when idle.
        started = trio.current_time()
        while True:
            # Any byte from the relay (heartbeats included) moves the deadline;
            # so does the application starting to read after a pause.
            deadline = max(self._conn.last_received, started) + self._silence
            with trio.move_on_at(deadline) as scope:
                frame = await self._conn.receive()
            if not scope.cancelled_caught:
                break
            if trio.current_time() >= max(self._conn.last_received, started) + self._silence:
                raise ConnectionClosed(
                    f"relay silent for {self._silence:g} s on the stream", code=ErrorCode.TIMEOUT
                )
        if frame.kind is FrameKind.BATCH:
            header, records = self._decoder.decode(frame.payload)
            start = self._last_seq
            if header.last_seq >= header.first_seq:
                self._cover(header.first_seq, header.last_seq)
            for record in records:
                if start is not None and record.seq <= start:
                    continue  # already delivered
                if record.level >= self.min_level:
                    self._ready.append(record)
                    self.records_received += 1
            return
        message = decode_message(frame)
        if isinstance(message, GapNotice):
            if self._last_seq is not None and message.last_seq <= self._last_seq:
                return
            first = message.first_seq
            if self._last_seq is not None:
                first = max(first, self._last_seq + 1)
            self._cover(first, message.last_seq)
            self._ready.append(Gap(first, message.last_seq, message.reason))
            self.gaps_received += 1
        elif isinstance(message, StreamEnd):
            self.end_code = message.code
            self.end_reason = message.reason
            if message.code not in (ErrorCode.SESSION_ENDED, ErrorCode.AGENT_LOST, ErrorCode.STOPPED):
                raise ConnectionClosed(message.reason or "the stream was closed", code=message.code)
        else:
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__} on a data connection",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )


class SessionEvents:
    """An async iterator of :data:`SessionEvent` (see :meth:`Viewer.session_events`).

    Raises (from ``anext``):
      ConnectionClosed: the viewer's connection to the relay closed.
      LoupeError: this iterator fell more than 10,000 events behind; re-read
        ``sessions()`` and call ``session_events()`` again.
    """

    def __init__(
        self,
        viewer: Viewer,
        send: trio.MemorySendChannel[SessionEvent],
        receive: trio.MemoryReceiveChannel[SessionEvent],
    ) -> None:
        self._viewer = viewer
        self._send = send
        self._receive = receive

    def __aiter__(self) -> SessionEvents:
        return self

    async def __anext__(self) -> SessionEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self._viewer._closed is not None:
                raise self._viewer._closed from None
            raise LoupeError("session events fell too far behind; re-read sessions()") from None
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Stop receiving events."""
        self._viewer._listeners.discard(self._send)
        self._send.close()
        await self._receive.aclose()


class Viewer:
    """A connection to a relay's viewer port.  Made by :func:`open_viewer`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None,
        tls: bool | ssl.SSLContext,
        ca_file: str | None,
        connector: Connector | None = None,
    ) -> None:
        self.host = host
        self._connector = connector
        self.port = port
        self._token = token
        self._tls = tls
        self._ca_file = ca_file
        self._sessions: dict[str, SessionInfo] = {}
        self._listeners: set[trio.MemorySendChannel[SessionEvent]] = set()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._heartbeat_interval = 5.0
        self._closed: ConnectionClosed | None = None
        self._control: Connection | None = None

    def sessions(self) -> list[SessionInfo]:
        """The live sessions, as of the last update received."""
        return list(self._sessions.values())

    def _hello(self, role: Role, **kwargs: object) -> Hello:
        return Hello(role=role, token=self._token, client=f"loupelive-viewer/{__version__}", **kwargs)  # type: ignore[arg-type]

    async def _heartbeats(self, conn: Connection) -> None:
        interval = self._heartbeat_interval
        await conn.serve_heartbeats(interval, interval * 3)

    async def _start(self, nursery: trio.Nursery) -> None:
        conn, accept = await connect(
            self.host,
            self.port,
            self._hello(Role.VIEWER_CONTROL),
            tls=self._tls,
            ca_file=self._ca_file,
            connector=self._connector,
        )
        self._heartbeat_interval = accept.heartbeat_interval
        self._control = conn
        try:
            while True:
                message = await conn.receive_message()
                if isinstance(message, SnapshotEnd):
                    break
                self._apply(message)
        except BaseException:
            await conn.aclose()
            raise
        self._nursery = nursery
        nursery.start_soon(self._heartbeats, conn)
        nursery.start_soon(self._read_control, conn)

    def _apply(self, message: object) -> None:
        if isinstance(message, (SessionAdded, SessionChanged)):
            self._sessions[message.session.session_id] = message.session
        elif isinstance(message, SessionEnded):
            self._sessions.pop(message.session_id, None)
        else:
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__} on the viewer control connection",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )
        self._changed.set()
        self._changed = trio.Event()

    async def _read_control(self, conn: Connection) -> None:
        try:
            while True:
                message = await conn.receive_message()
                self._apply(message)
                for listener in list(self._listeners):
                    try:
                        listener.send_nowait(message)  # type: ignore[arg-type]
                    except trio.ClosedResourceError:
                        self._listeners.discard(listener)
                    except trio.WouldBlock:
                        self._listeners.discard(listener)
                        listener.close()
        except ConnectionClosed as exc:
            self._closed = exc
            raise
        finally:
            for listener in self._listeners:
                listener.close()
            self._changed.set()

    def session_events(self) -> SessionEvents:
        """Iterate over session list changes from this call on.

        Events are buffered from the moment of the call (not of the first
        ``anext``), so nothing between the call and the loop is missed.
        """
        send, receive = trio.open_memory_channel[SessionEvent](MAX_EVENT_BACKLOG)
        events = SessionEvents(self, send, receive)
        self._listeners.add(send)
        return events

    def find_session(self, name: str) -> SessionInfo:
        """Resolve a session id, an unambiguous id prefix, or an app with one live session.

        Raises:
          SessionNotFound: nothing, or more than one session, matches.
        """
        sessions = self.sessions()
        exact = [s for s in sessions if s.session_id == name]
        if exact:
            return exact[0]
        by_prefix = [s for s in sessions if s.session_id.startswith(name)]
        by_app = [s for s in sessions if s.app == name]
        matches = by_prefix or by_app
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise SessionNotFound(f"no live session matches {name!r}")
        ids = ", ".join(f"{s.session_id} ({s.app})" for s in matches[:5])
        raise SessionNotFound(f"{name!r} matches {len(matches)} sessions: {ids}")

    async def wait_for_session(self, name: str) -> SessionInfo:
        """Wait until :meth:`find_session` finds exactly one session for ``name``."""
        while True:
            with contextlib.suppress(SessionNotFound):
                return self.find_session(name)
            if self._closed is not None:
                raise self._closed
            await self._changed.wait()

    async def wait_sessions(self, predicate: Callable[[list[SessionInfo]], bool]) -> list[SessionInfo]:
        """Wait until ``predicate(sessions())`` is true; return the sessions."""
        while not predicate(self.sessions()):
            if self._closed is not None:
                raise self._closed
            await self._changed.wait()
        return self.sessions()

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        session_id: str,
        *,
        history: int = 0,
        min_level: Level | int = 0,
        after_seq: int | None = None,
    ) -> AsyncIterator[Stream]:
        """Watch one session.

        Args:
          session_id: the exact session id.
          history: up to this many recent records (at or above ``min_level``)
            that the agent still holds, before the live ones.
          min_level: drop records below this level.
          after_seq: instead of ``history``, every held record after this seq.

        Raises:
          HandshakeRejected: unknown session (``unknown_session``) or a limit.
        """
        conn, accept = await connect(
            self.host,
            self.port,
            self._hello(
                Role.VIEWER_DATA,
                session_id=session_id,
                history=history,
                min_level=int(min_level),
                after_seq=after_seq,
            ),
            tls=self._tls,
            ca_file=self._ca_file,
            max_payload=MAX_DATA_PAYLOAD,
            connector=self._connector,
        )
        try:
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    # Heartbeats out only; the stream checks the relay's side.
                    interval = self._heartbeat_interval
                    nursery.start_soon(conn.serve_heartbeats, interval, math.inf)
                    yield Stream(conn, accept.session, min_level, silence=interval * 3)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()


@contextlib.asynccontextmanager
async def open_viewer(
    host: str = "127.0.0.1",
    port: int = DEFAULT_VIEWER_PORT,
    *,
    token: str | None = None,
    tls: bool | ssl.SSLContext = False,
    ca_file: str | None = None,
    connector: Connector | None = None,
) -> AsyncIterator[Viewer]:
    """Connect to a relay's viewer port; yields once the session list is complete.

    Raises:
      OSError: the relay cannot be reached.
      HandshakeRejected: the relay refused (AuthenticationError for a bad token).
    """
    viewer = Viewer(host, port, token=token, tls=tls, ca_file=ca_file, connector=connector)
    try:
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                await viewer._start(nursery)
                try:
                    yield viewer
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        if viewer._control is not None:
            with trio.CancelScope(shield=True):
                await viewer._control.aclose()

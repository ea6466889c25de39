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
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import trio
import trio_util

from . import __version__
from ._util import Backoff, collapse_groups
from .config import DEFAULT_VIEWER_PORT
from .connection import Connection, Connector, connect
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ErrorCode,
    HandshakeRejected,
    LoupeError,
    RemoteProtocolError,
    SessionNotFound,
    StreamDecodeError,
)
from .messages import (
    Accept,
    GapNotice,
    GetStats,
    Hello,
    PauseList,
    ResumeList,
    Role,
    SessionAdded,
    SessionChanged,
    SessionCounts,
    SessionEnded,
    SessionInfo,
    SnapshotBegin,
    SnapshotEnd,
    Stats,
    StreamEnd,
    decode_message,
)
from .records import BatchDecoder, Gap, Level, Record
from .wire import MAX_DATA_PAYLOAD, FrameKind

__all__ = ["SessionEvent", "SessionEvents", "Stream", "Viewer", "open_viewer"]

#: What :meth:`Viewer.session_events` yields.  SESSION_COUNTS (live record
#: counters and clock estimates, at most once a second per session) comes as
#: one event per frame; :meth:`Viewer.sessions` already reflects it.
SessionEvent = SessionAdded | SessionChanged | SessionEnded | SessionCounts

#: Session events buffered per ``session_events()`` iterator.  A consumer that
#: falls this far behind gets an error and should re-read ``sessions()``.
MAX_EVENT_BACKLOG: Final = 10_000

GAP_MISSING: Final = "missing"

#: How long a broken stream (or the session list) keeps trying to come back:
#: long enough for a relay restart and the agent's re-registration.
DEFAULT_RESUME_TIMEOUT: Final = 60.0

log = logging.getLogger("loupelive.viewer")


class Stream:
    """One session's records, as an async iterator of :class:`Record` and :class:`Gap`.

    Made by :meth:`Viewer.open_stream`.  If the data connection breaks (the
    relay restarted, the network dropped, a batch failed to decode), the stream
    reconnects by itself with backoff and asks for the records after the last
    seq it delivered, so the consumer sees every record exactly once, in seq
    order, or a :class:`Gap` naming exactly what can no longer be had and why.
    It gives up after ``resume_timeout`` seconds without success.

    Iteration ends when the session ends (``end_code`` then says how:
    ``session_ended``, ``agent_lost``); a stream the relay cut off for being too
    slow raises :class:`ConnectionClosed` with code ``slow_consumer``.
    """

    def __init__(
        self,
        viewer: Viewer,
        session_id: str,
        *,
        history: int,
        min_level: Level | int,
        after_seq: int | None,
        resume_timeout: float,
        nursery: trio.Nursery,
    ) -> None:
        self._viewer = viewer
        self.session_id = session_id
        self._history = history
        self._after_seq = after_seq
        self._resume_timeout = resume_timeout
        self._nursery = nursery
        self._conn: Connection | None = None
        self._heartbeat_scope: trio.CancelScope | None = None
        self._silence = 15.0
        self.session: SessionInfo | None = None
        self.min_level = int(min_level)
        self._decoder = BatchDecoder()
        self._ready: collections.deque[Record | Gap] = collections.deque()
        # Resuming after a seq: nothing at or before it is delivered, even if
        # the agent is not that far yet.
        self._last_seq: int | None = after_seq
        self.end_code: ErrorCode | None = None
        self.end_reason = ""
        self.records_received = 0
        self.gaps_received = 0
        #: How many times the stream was resumed after a break.
        self.resumes = 0
        #: Set once the history asked for at the start has been received (the
        #: last history batch, or the first live one, arrived).
        self.history_done = trio.Event()

    async def _connect(self) -> None:
        """Open (or reopen) the data connection, from where the consumer is."""
        history = self._history
        after_seq = self._after_seq
        if self._last_seq is not None:
            history, after_seq = 0, self._last_seq
        conn, accept = await self._viewer._open_data(
            self.session_id, history=history, min_level=self.min_level, after_seq=after_seq
        )
        self._conn = conn
        self.session = accept.session or self.session
        self._decoder = BatchDecoder()
        interval = accept.heartbeat_interval
        self._silence = interval * 3
        scope = trio.CancelScope()
        self._heartbeat_scope = scope

        async def heartbeats() -> None:
            # Heartbeats out only; the reader checks the relay's side.
            with scope, contextlib.suppress(ConnectionClosed):
                await conn.serve_heartbeats(interval, math.inf)

        self._nursery.start_soon(heartbeats)

    async def _disconnect(self) -> None:
        if self._heartbeat_scope is not None:
            self._heartbeat_scope.cancel()
        if self._conn is not None:
            with trio.CancelScope(shield=True):
                await self._conn.aclose()
            self._conn = None

    async def _resume(self, error: Exception) -> None:
        """Reconnect after ``error``, retrying until ``resume_timeout``."""
        await self._disconnect()
        log.warning(
            "stream of session %s broke (%s); resuming after seq %s", self.session_id, error, self._last_seq
        )
        backoff = Backoff(first=0.1, maximum=2.0)
        deadline = trio.current_time() + self._resume_timeout
        while True:
            try:
                await self._connect()
            except AuthenticationError:
                raise
            except HandshakeRejected as exc:
                # unknown_session: the relay restarted and the agent has not
                # registered again yet; keep trying until the deadline.
                error = exc
            except (OSError, ConnectionClosed, RemoteProtocolError) as exc:
                error = exc
            else:
                self.resumes += 1
                log.info("stream of session %s resumed after seq %s", self.session_id, self._last_seq)
                return
            if trio.current_time() >= deadline:
                raise ConnectionClosed(
                    f"could not resume the stream of session {self.session_id} "
                    f"within {self._resume_timeout:g} s: {error}",
                    code=getattr(error, "code", ErrorCode.INTERNAL),
                ) from error
            await trio.sleep(backoff.next_delay())

    @property
    def buffered(self) -> int:
        """Items decoded and ready: ``anext`` returns at once while this is > 0."""
        return len(self._ready)

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
            try:
                await self._fill()
            except (ConnectionClosed, StreamDecodeError) as exc:
                if not self._resumable(exc):
                    raise
                await self._resume(exc)
        return self._ready.popleft()

    def _resumable(self, exc: Exception) -> bool:
        if self._resume_timeout <= 0 or self.end_code is not None:
            return False
        if isinstance(exc, StreamDecodeError):
            return True
        # A relay that cut us off for being slow said so: tell the consumer.
        assert isinstance(exc, ConnectionClosed)
        return exc.code not in (ErrorCode.SLOW_CONSUMER, ErrorCode.BAD_TOKEN, ErrorCode.UNKNOWN_SESSION)

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
        if self._conn is None:
            raise ConnectionClosed("the stream is not connected", code=ErrorCode.INTERNAL)
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
            if header.history_end or not header.history:
                self.history_done.set()
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
            if message.code not in (ErrorCode.SESSION_ENDED, ErrorCode.AGENT_LOST, ErrorCode.STOPPED):
                # Not the end of the session (e.g. the relay shutting down):
                # a break, resumed like any other.
                raise ConnectionClosed(message.reason or "the stream was closed", code=message.code)
            self.end_code = message.code
            self.end_reason = message.reason
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
        self._heartbeat_interval = 5.0
        self._closed: ConnectionClosed | None = None
        self._control: Connection | None = None
        self._stats_waiters: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self._list_paused = False
        # A fresh snapshot being received (after RESUME_LIST), or None.
        self._new_snapshot: dict[str, SessionInfo] | None = None
        # Set when a fresh snapshot has been applied (after RESUME_LIST or a reconnect).
        self._snapshot_applied = trio.Event()
        #: True while the control connection is up (it reconnects by itself).
        self.connected = trio_util.AsyncBool(True)

    def sessions(self) -> list[SessionInfo]:
        """The live sessions, as of the last update received."""
        return list(self._sessions.values())

    def session(self, session_id: str) -> SessionInfo | None:
        """One live session's latest information, or None."""
        return self._sessions.get(session_id)

    def _hello(self, role: Role, **kwargs: object) -> Hello:
        return Hello(role=role, token=self._token, client=f"loupelive-viewer/{__version__}", **kwargs)  # type: ignore[arg-type]

    async def _heartbeats(self, conn: Connection) -> None:
        interval = self._heartbeat_interval
        await conn.serve_heartbeats(interval, interval * 3)

    async def _connect_control(self) -> tuple[Connection, dict[str, SessionInfo]]:
        """Open the control connection; return it with the relay's snapshot."""
        conn, accept = await connect(
            self.host,
            self.port,
            self._hello(Role.VIEWER_CONTROL),
            tls=self._tls,
            ca_file=self._ca_file,
            connector=self._connector,
        )
        self._heartbeat_interval = accept.heartbeat_interval
        snapshot: dict[str, SessionInfo] = {}
        try:
            while True:
                message = await conn.receive_message()
                if isinstance(message, SnapshotEnd):
                    return conn, snapshot
                if not isinstance(message, SessionAdded):
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} in the session snapshot",
                        code=ErrorCode.UNEXPECTED_MESSAGE,
                    )
                snapshot[message.session.session_id] = message.session
        except BaseException:
            await conn.aclose()
            raise

    async def _start(self, nursery: trio.Nursery) -> None:
        conn, snapshot = await self._connect_control()
        self._sessions = snapshot
        self._control = conn
        nursery.start_soon(self._serve_control, conn)

    async def _serve_control(self, conn: Connection) -> None:
        """Read list updates; reconnect (with backoff) when the relay goes away."""
        backoff = Backoff(first=0.1, maximum=5.0)
        try:
            while True:
                try:
                    with collapse_groups():
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._heartbeats, conn)
                            await self._read_control(conn)
                except (ConnectionClosed, RemoteProtocolError) as exc:
                    log.warning("lost the relay %s:%d (%s); reconnecting", self.host, self.port, exc)
                self.connected.value = False
                # Questions asked on the lost connection will not be answered.
                for waiter in self._stats_waiters:
                    waiter.close()
                self._stats_waiters.clear()
                with trio.CancelScope(shield=True):
                    await conn.aclose()
                while True:
                    await trio.sleep(backoff.next_delay())
                    try:
                        conn, snapshot = await self._connect_control()
                    except AuthenticationError:
                        raise
                    except (OSError, ConnectionClosed, RemoteProtocolError) as exc:
                        log.info("relay %s:%d still unreachable: %s", self.host, self.port, exc)
                        continue
                    break
                backoff.reset()
                self._control = conn
                self.connected.value = True
                log.info("reconnected to the relay %s:%d", self.host, self.port)
                self._new_snapshot = None
                self._resync(snapshot)
                self._snapshot_applied.set()
                if self._list_paused:
                    await conn.send(PauseList())
        except AuthenticationError as exc:
            self._closed = exc
            raise
        finally:
            for listener in self._listeners:
                listener.close()
            self._changed.set()

    def _resync(self, snapshot: dict[str, SessionInfo]) -> None:
        """Turn the difference between the old list and a fresh snapshot into events."""
        events: list[SessionEvent] = []
        for session_id in list(self._sessions):
            if session_id not in snapshot:
                events.append(SessionEnded(session_id=session_id, reason="relay_lost"))
        for session_id, info in snapshot.items():
            old = self._sessions.get(session_id)
            if old is None:
                events.append(SessionAdded(session=info))
            elif old != info:
                events.append(SessionChanged(session=info))
        for event in events:
            self._apply(event)
            self._dispatch(event)

    def _apply(self, message: object) -> None:
        if isinstance(message, (SessionAdded, SessionChanged)):
            self._sessions[message.session.session_id] = message.session
        elif isinstance(message, SessionEnded):
            self._sessions.pop(message.session_id, None)
        elif isinstance(message, SessionCounts):
            for entry in message.counts:
                info = self._sessions.get(entry.session_id)
                if info is not None:
                    self._sessions[entry.session_id] = attrs.evolve(
                        info.with_counts(entry.counts), clock_offset=entry.clock_offset, rtt=entry.rtt
                    )
        else:
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__} on the viewer control connection",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )
        self._changed.set()
        self._changed = trio.Event()

    async def _read_control(self, conn: Connection) -> None:
        while True:
            message = await conn.receive_message()
            if isinstance(message, Stats):
                if self._stats_waiters:
                    self._stats_waiters.pop(0).send_nowait(message.stats)
                continue
            if isinstance(message, SnapshotBegin):
                self._new_snapshot = {}
                continue
            if self._new_snapshot is not None:
                # A fresh snapshot after RESUME_LIST: applied as a whole, as
                # the differences from what we held.
                if isinstance(message, SessionAdded):
                    self._new_snapshot[message.session.session_id] = message.session
                elif isinstance(message, SnapshotEnd):
                    snapshot, self._new_snapshot = self._new_snapshot, None
                    self._resync(snapshot)
                    self._snapshot_applied.set()
                else:
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} in a session snapshot",
                        code=ErrorCode.UNEXPECTED_MESSAGE,
                    )
                continue
            self._apply(message)
            self._dispatch(message)

    async def pause_list(self) -> None:
        """Ask the relay to stop sending session-list updates (e.g. on a slow link).

        :meth:`sessions` stays as it was until :meth:`resume_list`; the pause
        survives reconnects.
        """
        self._list_paused = True
        if self._control is not None:
            await self._control.send(PauseList())

    async def resume_list(self) -> None:
        """Updates again: the relay sends a fresh snapshot, applied as events.

        Returns once that snapshot is applied (:meth:`sessions` is current).
        """
        self._list_paused = False
        if self._control is None:
            return
        self._snapshot_applied = applied = trio.Event()
        await self._control.send(ResumeList())
        while not applied.is_set():
            if self._closed is not None:
                raise self._closed
            await self._changed.wait()

    async def statistics(self, *, detail: bool = False) -> dict[str, Any]:
        """The relay's statistics (``Relay.statistics()`` as JSON), asked over the wire.

        With ``detail``, also per session (the busiest first, as many as fit one
        frame; ``session_details_truncated`` says if some were left out).
        """
        if self._control is None:
            raise ConnectionClosed("not connected to the relay", code=ErrorCode.INTERNAL)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._stats_waiters.append(send)
        await self._control.send(GetStats(detail=detail))
        async with receive:
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                raise ConnectionClosed(
                    "the connection to the relay was lost before it answered", code=ErrorCode.INTERNAL
                ) from None

    def _dispatch(self, message: object) -> None:
        for listener in list(self._listeners):
            try:
                listener.send_nowait(message)  # type: ignore[arg-type]
            except trio.ClosedResourceError:
                self._listeners.discard(listener)
            except trio.WouldBlock:
                self._listeners.discard(listener)
                listener.close()

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

    async def _open_data(
        self, session_id: str, *, history: int, min_level: int, after_seq: int | None
    ) -> tuple[Connection, Accept]:
        return await connect(
            self.host,
            self.port,
            self._hello(
                Role.VIEWER_DATA,
                session_id=session_id,
                history=history,
                min_level=min_level,
                after_seq=after_seq,
            ),
            tls=self._tls,
            ca_file=self._ca_file,
            max_payload=MAX_DATA_PAYLOAD,
            connector=self._connector,
        )

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        session_id: str,
        *,
        history: int = 0,
        min_level: Level | int = 0,
        after_seq: int | None = None,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> AsyncIterator[Stream]:
        """Watch one session.

        Args:
          session_id: the exact session id.
          history: up to this many recent records (at or above ``min_level``)
            that the agent still holds, before the live ones.
          min_level: drop records below this level.
          after_seq: instead of ``history``, every held record after this seq.
          resume_timeout: how long a broken stream keeps trying to resume
            (0: do not resume; the break is raised).

        Raises:
          HandshakeRejected: unknown session (``unknown_session``) or a limit.
        """
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                stream = Stream(
                    self,
                    session_id,
                    history=history,
                    min_level=min_level,
                    after_seq=after_seq,
                    resume_timeout=resume_timeout,
                    nursery=nursery,
                )
                try:
                    await stream._connect()
                    yield stream
                finally:
                    await stream._disconnect()
                    nursery.cancel_scope.cancel()


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

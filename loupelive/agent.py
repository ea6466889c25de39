"""The agent: the part an application embeds to publish its log records.

Theory of operation
-------------------
:func:`open_agent` registers a session with the relay over the agent's control
connection, then waits for commands while only heartbeats flow.  ``log()`` is
synchronous and never blocks: it appends to a bounded ring buffer (by records and
by bytes; the oldest fall out first) and wakes the streamer.

When the relay sends ``START_STREAM n`` the streamer opens a dedicated data
connection for stream ``n`` and, in one task and therefore in one order:

1. sends each newly added viewer its history (self-contained ``HISTORY``
   batches, addressed to that viewer, covering records up to ``sent_upto``);
2. makes the next live batch a sync point (so the new viewer can start there);
3. sends the records after ``sent_upto`` as compressed live batches, filtered to
   the lowest level any viewer asked for; if the ring buffer dropped records
   before they could be sent, a ``GAP`` (``agent_overflow``) says exactly which.

``STOP_STREAM n`` (or leaving the ``open_agent`` block) makes the streamer flush
what it owes, send ``STREAM_END`` and close the data connection.  Leaving the
block then says ``GOODBYE`` on the control connection.  If the control connection
drops, the agent reconnects with backoff and registers the same session again.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import itertools
import logging
import math
import os
import platform
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import trio
import trio_util

from . import __version__
from ._util import Backoff, collapse_groups
from .config import DEFAULT_AGENT_PORT
from .connection import Connection, Connector, connect
from .errors import ConnectionClosed, ErrorCode, HandshakeRejected, RemoteProtocolError
from .messages import (
    AddViewer,
    Counts,
    GapNotice,
    Goodbye,
    Heartbeat,
    Hello,
    RemoveViewer,
    ReportCounts,
    RequestSync,
    Role,
    SessionInfo,
    StartStream,
    StopStream,
    StreamEnd,
    encode_message,
)
from .records import TARGET_RAW_BATCH, BatchEncoder, Level, PreparedBatch, Record, clip_record, text_size
from .wire import MAX_CONTROL_PAYLOAD, FrameKind, encode_frame

__all__ = ["Agent", "AgentStatistics", "default_session_info", "open_agent", "run_agent"]

log = logging.getLogger("loupelive.agent")

#: Ring buffer bounds: records kept for history and for a link slower than the
#: application's logging.  10,000 records is minutes of a busy service.
DEFAULT_BUFFER_RECORDS: Final = 10_000
DEFAULT_BUFFER_BYTES: Final = 16 * 1024 * 1024

#: No fixed batching delay by default: a record logged while the data
#: connection is idle goes out at once; records logged while a send is in flight
#: accumulate and leave together as the next batch, so a flood batches itself.
#: A positive ``max_delay`` trades latency for fewer, larger batches.
DEFAULT_MAX_DELAY: Final = 0.0

#: A fresh compression context at least this often even if nobody asks: bounds
#: how long a viewer that skipped ahead waits for a sync point.
DEFAULT_SYNC_INTERVAL: Final = 30.0

#: How long leaving ``open_agent`` may spend delivering what viewers are owed.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0

#: Batches with more raw bytes than this are compressed in a worker thread
#: (brotli releases the GIL) so the application's event loop keeps running.
THREAD_COMPRESS_THRESHOLD: Final = 64 * 1024

#: Reconnection: first retry after ~0.1 s, then doubling up to 5 s (jittered).
DEFAULT_RECONNECT_MIN: Final = 0.1
DEFAULT_RECONNECT_MAX: Final = 5.0

#: Record counters go to the relay at most this often (seconds), and only when
#: they changed: the session list shows them without a stream.
COUNTS_INTERVAL: Final = 1.0

#: Approximate fixed cost of a record in the ring buffer, on top of its text.
_RECORD_OVERHEAD: Final = 200

GAP_AGENT_OVERFLOW: Final = "agent_overflow"
GAP_HISTORY_UNAVAILABLE: Final = "history_unavailable"


def _record_size(record: Record) -> int:
    """Encoded size, slightly over-estimated (exact text bytes, generous framing)."""
    message, logger, thread = record.message, record.logger, record.thread
    # Inline ASCII fast paths: this runs for every record logged.
    size = _RECORD_OVERHEAD
    size += len(message) if message.isascii() else text_size(message)
    size += len(logger) if logger.isascii() else text_size(logger)
    size += len(thread) if thread.isascii() else text_size(thread)
    if record.exception:
        size += text_size(record.exception)
    if record.fields:
        for key, value in record.fields.items():
            size += text_size(key) + text_size(value) + 8
    return size


@attrs.frozen(kw_only=True)
class AgentStatistics:
    """What an agent has done so far."""

    records_logged: int
    records_buffered: int
    buffered_bytes: int
    records_dropped: int
    records_sent: int
    batches_sent: int
    bytes_sent: int
    viewers: int
    streaming: bool
    connected: bool


class Agent:
    """A session published to a relay.  Made by :func:`open_agent`."""

    def __init__(
        self,
        host: str,
        port: int,
        info: SessionInfo,
        *,
        token: str | None,
        tls: bool | ssl.SSLContext,
        ca_file: str | None,
        buffer_records: int,
        buffer_bytes: int,
        quality: int,
        max_delay: float,
        sync_interval: float,
        close_timeout: float,
        connector: Connector | None = None,
        reconnect_min: float = DEFAULT_RECONNECT_MIN,
        reconnect_max: float = DEFAULT_RECONNECT_MAX,
        clock: Callable[[], float] = time.time,
        fallbacks: Sequence[tuple[str, int]] = (),
    ) -> None:
        #: Every relay this agent may use, tried in turn when one fails (the
        #: relays of a cluster); ``host``/``port`` is the one in use.
        self.addresses: list[tuple[str, int]] = [(host, port), *fallbacks]
        self._address_index = 0
        self.host = host
        #: The wall clock that stamps records and answers the relay's clock
        #: probes (replaceable to simulate a skewed machine).
        self.clock = clock
        self._connector = connector
        self.port = port
        self.info = info
        self._token = token
        self._tls = tls
        self._ca_file = ca_file
        self._buffer: deque[Record] = deque()
        # The encoded-size estimate of each buffered record, evicted in step.
        self._sizes: deque[int] = deque()
        # Guards the buffer and the seq counter: records may come from any
        # thread (LiveHandler); the streamer copies what it sends under it.
        self._lock = threading.Lock()
        self._trio_thread: int | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._wake_scheduled = False
        self._buffer_records = buffer_records
        self._buffer_bytes_max = buffer_bytes
        self._buffered_bytes = 0
        self._quality = quality
        self._max_delay = max_delay
        self._sync_interval = sync_interval
        self._close_timeout = close_timeout
        self._next_seq = 1
        self._wake = trio.Event()
        self._viewers: dict[int, AddViewer] = {}
        self._pending: dict[int, AddViewer] = {}
        self._sync_requested = False
        self._stream_wanted: trio_util.AsyncValue[int | None] = trio_util.AsyncValue(None)
        self._streaming = trio_util.AsyncBool(False)
        self._closing = False
        #: True while the control connection is up.
        self.connected = trio_util.AsyncBool(False)
        #: ``connecting``, ``connected``, ``disconnected`` (retrying) or ``closed``.
        self.status = "connecting"
        #: The last connection error, for status displays.
        self.last_error = ""
        # Proves to the relay that a reconnecting agent owns this session.
        self._secret = secrets.token_urlsafe(24)
        # Set once the first connection attempt succeeded or failed.
        self._first_attempt_done = trio.Event()
        self._stream_key = ""
        self._backoff = Backoff(first=reconnect_min, maximum=reconnect_max)
        self._dropped = 0
        self._records_sent = 0
        self._batches_sent = 0
        self._bytes_sent = 0
        self._sent_upto = 0
        #: The last seq handed to an in-flight batch (>= sent_upto).
        self._taken_upto = 0
        self._heartbeat_interval = 5.0
        self._control: Connection | None = None
        self._data_conn: Connection | None = None
        # Record counters (under the lock), reported by _report_counts.
        self._critical = 0
        self._errors = 0
        self._warnings = 0
        self._last_record_at = 0.0
        self._counts_pending = False
        self._counts_wake_needed = False
        self._counts_event = trio.Event()
        # The relay's last clock probe: (its time, our monotonic time at arrival).
        self._probe: tuple[float, float, float] | None = None
        self._probe_event = trio.Event()

    @property
    def session_id(self) -> str:
        return self.info.session_id

    # -- the application's side ----------------------------------------------------

    def log(
        self,
        level: Level | int,
        message: str,
        *,
        logger: str = "",
        thread: str | None = None,
        exception: str | None = None,
        fields: Mapping[str, object] | None = None,
        timestamp: float | None = None,
    ) -> int:
        """Append a record; never blocks.  Returns its seq.

        Must be called from the Trio thread that runs the agent.
        """
        return self.add(
            timestamp=self.clock() if timestamp is None else timestamp,
            level=level,
            logger=logger,
            message=message,
            thread=threading.current_thread().name if thread is None else thread,
            exception=exception,
            fields=fields,
        )

    def add(
        self,
        *,
        timestamp: float,
        level: Level | int,
        logger: str,
        message: str,
        thread: str,
        exception: str | None,
        fields: Mapping[str, object] | None,
        file: str = "",
        line: int = 0,
        function: str = "",
        module: str = "",
        process: int = 0,
        thread_id: int = 0,
    ) -> int:
        """Build a record with the next seq and append it (thread-safe).  Returns the seq.

        The record is built once, with its final seq, under the buffer lock.
        """
        with self._lock:
            record = Record._build(
                self._next_seq,
                timestamp,
                level,
                logger,
                message,
                thread,
                exception,
                fields,
                file,
                line,
                function,
                module,
                process,
                thread_id,
            )
            seq = self._append_locked(clip_record(record))
        self._notify()
        return seq

    def append(self, record: Record) -> int:
        """Append a prepared record, renumbered to the next seq.  Returns its seq.

        Thread-safe and never blocks: from the agent's own Trio thread it wakes
        the streamer directly; from any other thread (``LiveHandler``) it
        schedules one wake-up on the agent's loop, and only while streaming —
        while nobody watches, a record costs this append and nothing more.
        """
        record = clip_record(record)
        with self._lock:
            if record.seq != self._next_seq:
                record = attrs.evolve(record, seq=self._next_seq)
            seq = self._append_locked(record)
        self._notify()
        return seq

    def _append_locked(self, record: Record) -> int:
        """Append ``record`` (numbered ``_next_seq``); the caller holds the lock."""
        seq = self._next_seq
        self._next_seq = seq + 1
        level = record.level
        if level >= 30:
            if level >= 50:
                self._critical += 1
            elif level >= 40:
                self._errors += 1
            else:
                self._warnings += 1
        self._last_record_at = record.timestamp
        if not self._counts_pending:
            self._counts_pending = True
            self._counts_wake_needed = True
        size = _record_size(record)
        buffer = self._buffer
        buffer.append(record)
        self._sizes.append(size)
        self._buffered_bytes += size
        while len(buffer) > self._buffer_records or (
            self._buffered_bytes > self._buffer_bytes_max and len(buffer) > 1
        ):
            old = buffer.popleft()
            self._buffered_bytes -= self._sizes.popleft()
            if self._streaming.value and old.seq > self._taken_upto:
                self._dropped += 1
        return seq

    def _notify(self) -> None:
        """Wake the streamer after an append (outside the lock)."""
        if self._counts_wake_needed:
            # The counters changed after the last report: wake the reporter
            # (at most once per report, so at most once a second).
            self._counts_wake_needed = False
            if threading.get_ident() == self._trio_thread:
                self._counts_event.set()
            elif self._trio_token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._trio_token.run_sync_soon(self._wake_counts)
        if threading.get_ident() == self._trio_thread:
            self._wake.set()
        elif (self._streaming.value or self._closing) and not self._wake_scheduled:
            self._wake_scheduled = True
            try:
                assert self._trio_token is not None
                self._trio_token.run_sync_soon(self._wake_from_thread)
            except (trio.RunFinishedError, AssertionError):
                self._wake_scheduled = False

    def _wake_counts(self) -> None:
        self._counts_event.set()

    def counts(self) -> Counts:
        """The record counters as the session list shows them."""
        with self._lock:
            return self._counts_locked()

    def _counts_locked(self) -> Counts:
        return Counts(
            records=self._next_seq - 1,
            critical=self._critical,
            errors=self._errors,
            warnings=self._warnings,
            last_record_at=self._last_record_at,
        )

    def _wake_from_thread(self) -> None:
        self._wake_scheduled = False
        self._wake.set()

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            records_logged=self._next_seq - 1,
            records_buffered=len(self._buffer),
            buffered_bytes=self._buffered_bytes,
            records_dropped=self._dropped,
            records_sent=self._records_sent,
            batches_sent=self._batches_sent,
            bytes_sent=self._bytes_sent,
            viewers=len(self._viewers),
            streaming=self._streaming.value,
            connected=self.connected.value,
        )

    # -- control connection ----------------------------------------------------------

    def _hello(self, role: Role, **kwargs: object) -> Hello:
        return Hello(role=role, token=self._token, client=f"loupelive-agent/{__version__}", **kwargs)  # type: ignore[arg-type]

    async def _connect(self, hello: Hello) -> Connection:
        conn, accept = await connect(
            self.host,
            self.port,
            hello,
            tls=self._tls,
            ca_file=self._ca_file,
            max_payload=MAX_CONTROL_PAYLOAD,
            connector=self._connector,
        )
        self._heartbeat_interval = accept.heartbeat_interval
        return conn

    async def _heartbeats(self, conn: Connection) -> None:
        # The relay says how often it heartbeats; three missed ones mean it is gone.
        interval = self._heartbeat_interval
        await conn.serve_heartbeats(interval, interval * 3)

    async def _serve_control(
        self, *, wait_connected: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the control connection up, reconnecting with backoff.

        With ``wait_connected``, the first attempt's error is raised (and
        ``started()`` waits for the first connection); otherwise every failure
        is retried and ``started()`` is called at once.
        """
        backoff = self._backoff
        first = wait_connected
        if not wait_connected:
            task_status.started()
        while not self._closing:
            self.status = "connecting"
            try:
                conn = await self._connect(
                    self._hello(Role.AGENT_CONTROL, session=self.info, secret=self._secret)
                )
            except (OSError, ConnectionClosed, RemoteProtocolError) as exc:
                self._first_attempt_done.set()
                self.last_error = str(exc)
                if first and self._address_index == len(self.addresses) - 1:
                    raise  # every relay was tried once
                if len(self.addresses) > 1:
                    self._next_address()
                    if first:
                        continue
                delay = backoff.next_delay()
                if isinstance(exc, HandshakeRejected) and exc.code not in (
                    ErrorCode.SESSION_CONFLICT,
                    ErrorCode.LIMIT_REACHED,
                    ErrorCode.SHUTDOWN,
                ):
                    log.error("relay %s:%d refused the session: %s", self.host, self.port, exc)
                else:
                    log.info(
                        "relay %s:%d unreachable (%s); retrying in %.1f s", self.host, self.port, exc, delay
                    )
                self.status = "disconnected"
                await trio.sleep(delay)
                continue
            backoff.reset()
            self._first_attempt_done.set()
            self._control = conn
            self.connected.value = True
            self.status = "connected"
            if first:
                first = False
                task_status.started()
            try:
                await self._run_control(conn)
            except (ConnectionClosed, RemoteProtocolError) as exc:
                if not self._closing:
                    self.last_error = str(exc)
                    log.warning("lost the relay %s:%d: %s", self.host, self.port, exc)
            finally:
                self.connected.value = False
                self._control = None
                # The relay forgets our viewers and streams with the session.
                self._viewers.clear()
                self._pending.clear()
                self._stream_wanted.value = None
                self._wake.set()
                self.status = "disconnected"
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            if not self._closing:
                await trio.sleep(backoff.next_delay())
        self.status = "closed"

    def _next_address(self) -> None:
        """Try the next relay next time (several relays: a cluster)."""
        old = (self.host, self.port)
        self._address_index = (self._address_index + 1) % len(self.addresses)
        self.host, self.port = self.addresses[self._address_index]
        log.info("relay %s:%d failed; trying %s:%d", *old, self.host, self.port)

    async def _run_control(self, conn: Connection) -> None:
        with collapse_groups():
            await self._run_control_tasks(conn)

    async def _run_control_tasks(self, conn: Connection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats, conn)
            nursery.start_soon(self._report_counts, conn)
            nursery.start_soon(self._answer_probes, conn)
            conn.on_heartbeat = self._on_heartbeat
            while True:
                message = await conn.receive_message()
                if isinstance(message, StartStream):
                    self._stream_key = message.key
                    self._stream_wanted.value = message.stream
                elif isinstance(message, StopStream):
                    if self._stream_wanted.value == message.stream:
                        self._stream_wanted.value = None
                elif isinstance(message, AddViewer):
                    self._viewers[message.viewer] = message
                    self._pending[message.viewer] = message
                    self._sync_requested = True
                elif isinstance(message, RemoveViewer):
                    self._viewers.pop(message.viewer, None)
                    self._pending.pop(message.viewer, None)
                elif isinstance(message, RequestSync):
                    self._sync_requested = True
                else:
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} from the relay",
                        code=ErrorCode.UNEXPECTED_MESSAGE,
                    )
                self._wake.set()

    async def _report_counts(self, conn: Connection) -> None:
        """Send the record counters when they changed, at most every COUNTS_INTERVAL."""
        last: Counts | None = None
        if self._next_seq > 1:
            self._counts_event.set()  # a new connection: report at once
        while True:
            await self._counts_event.wait()
            self._counts_event = trio.Event()
            with self._lock:
                self._counts_pending = False
                counts = self._counts_locked()
            if counts != last:
                await conn.send(ReportCounts(counts=counts))
                last = counts
            await trio.sleep(COUNTS_INTERVAL)

    def _on_heartbeat(self, heartbeat: Heartbeat) -> None:
        # Called by the connection's reader the moment a heartbeat arrives:
        # stamp a clock probe with our clock now, answer it from a task.
        if heartbeat.time and not heartbeat.echo:
            self._probe = (heartbeat.time, self.clock(), trio.current_time())
            self._probe_event.set()

    async def _answer_probes(self, conn: Connection) -> None:
        while True:
            await self._probe_event.wait()
            self._probe_event = trio.Event()
            probe, self._probe = self._probe, None
            if probe is None:
                continue
            relay_time, arrived, arrived_mono = probe
            hold = max(0.0, trio.current_time() - arrived_mono)
            await conn.send(Heartbeat(time=arrived, echo=relay_time, hold=hold))

    # -- data streams -------------------------------------------------------------

    async def _serve_streams(self) -> None:
        while True:
            stream_no = await self._stream_wanted.wait_value(lambda v: v is not None)
            assert stream_no is not None
            try:
                with collapse_groups():
                    await self._stream(stream_no)
            except (OSError, ConnectionClosed, RemoteProtocolError) as exc:
                log.warning("stream %d to %s:%d failed: %s", stream_no, self.host, self.port, exc)
                # The relay restarts the stream with a new number if it still
                # wants one; wait for that rather than retrying this one.
                await self._stream_wanted.wait_value(lambda v, n=stream_no: v != n)
            if self._closing:
                return

    async def _wait_for_batch(self) -> None:
        """With ``max_delay``: wait until a batch's worth is logged, or the delay."""
        with trio.move_on_after(self._max_delay):
            start = self._next_seq
            while (self._next_seq - start) * _RECORD_OVERHEAD < TARGET_RAW_BATCH and not self._closing:
                await self._wait_wake()

    async def _wait_wake(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    async def _stream(self, stream_no: int) -> None:
        conn = await self._connect(
            self._hello(Role.AGENT_DATA, session_id=self.session_id, stream=stream_no, key=self._stream_key)
        )
        self._data_conn = conn
        encoder = BatchEncoder(quality=self._quality)
        self._sent_upto = self._taken_upto = self._next_seq - 1
        self._streaming.value = True
        self._sync_requested = True
        last_sync = -math.inf
        log.info("session %s: streaming (stream %d)", self.session_id, stream_no)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, conn)
                nursery.start_soon(self._drain_data_input, conn)
                while True:
                    if self._pending:
                        await self._send_histories(conn, encoder)
                        self._sync_requested = True
                    if self._sent_upto < self._next_seq - 1:
                        now = trio.current_time()
                        sync = self._sync_requested or now - last_sync >= self._sync_interval
                        if await self._send_live(conn, encoder, sync=sync):
                            if sync:
                                last_sync = now
                                self._sync_requested = False
                        continue
                    if self._sync_requested and self._viewers:
                        # Asked for a sync point with nothing new to send (a
                        # viewer or relay caught up after skipping, in a quiet
                        # session): an empty sync batch, so it resumes now and
                        # learns what it lost, instead of at the next record.
                        await self._send_empty_sync(conn, encoder)
                        last_sync = trio.current_time()
                        self._sync_requested = False
                        continue
                    if self._closing or self._stream_wanted.value != stream_no:
                        break
                    await self._wait_wake()
                    if self._max_delay > 0 and not self._closing and not self._pending:
                        await self._wait_for_batch()
                code = ErrorCode.SESSION_ENDED if self._closing else ErrorCode.STOPPED
                await conn.send(StreamEnd(code=code, reason="", last_seq=self._sent_upto))
                nursery.cancel_scope.cancel()
        finally:
            self._streaming.value = False
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _drain_data_input(self, conn: Connection) -> None:
        while True:
            message = await conn.receive_message()
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__} on a data connection",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )

    def _min_level(self) -> int:
        return min((v.min_level for v in self._viewers.values()), default=0)

    async def _send_live(self, conn: Connection, encoder: BatchEncoder, *, sync: bool) -> bool:
        """Send the next live batch after ``sent_upto``.  True if a batch went.

        If the ring buffer dropped records that were never sent, a GAP
        (``agent_overflow``) naming exactly those seqs goes first, in the same
        write as the batch: under overload the stream keeps moving.
        """
        if not self._viewers:
            # Nobody to send to (the stream is in its grace period): the range is
            # covered by the history any new viewer will get.
            self._sent_upto = self._taken_upto = self._next_seq - 1
            return False
        min_level = self._min_level()
        records: list[Record] = []
        size = 0
        out = bytearray()
        with self._lock:
            buffer = self._buffer
            oldest = buffer[0].seq if buffer else self._next_seq
            if self._sent_upto + 1 < oldest:
                out += encode_message(
                    GapNotice(first_seq=self._sent_upto + 1, last_seq=oldest - 1, reason=GAP_AGENT_OVERFLOW)
                )
                self._sent_upto = self._taken_upto = oldest - 1
            first = self._sent_upto + 1
            last = self._sent_upto
            skip = first - oldest
            for record, record_size in zip(
                itertools.islice(buffer, skip, None), itertools.islice(self._sizes, skip, None), strict=True
            ):
                last = record.seq
                if record.level >= min_level:
                    records.append(record)
                    size += record_size
                    if size >= TARGET_RAW_BATCH:
                        break
            # From here these records are in flight: evicting them is no loss.
            self._taken_upto = last
        if last < first:
            if out:
                await conn.send_raw(out)
            return False
        batch = encoder.prepare(records, first_seq=first, last_seq=last, sync=sync)
        payload = await self._compress(encoder, batch)
        out += encode_frame(FrameKind.BATCH, payload)
        await conn.send_raw(out)
        self._sent_upto = last
        self._records_sent += len(records)
        self._batches_sent += 1
        self._bytes_sent += len(out)
        return True

    async def _send_empty_sync(self, conn: Connection, encoder: BatchEncoder) -> None:
        first = self._sent_upto + 1
        batch = encoder.prepare([], first_seq=first, last_seq=first - 1, sync=True)
        payload = await self._compress(encoder, batch)
        await conn.send_raw(encode_frame(FrameKind.BATCH, payload))
        self._batches_sent += 1
        self._bytes_sent += len(payload) + 5

    @staticmethod
    async def _compress(encoder: BatchEncoder, batch: PreparedBatch) -> bytes:
        # Only brotli runs in the thread: it releases the GIL, while encoding
        # records is Python and would fight the application for it.
        if len(batch.raw) >= THREAD_COMPRESS_THRESHOLD:
            return await trio.to_thread.run_sync(encoder.compress, batch)
        return encoder.compress(batch)

    async def _send_histories(self, conn: Connection, encoder: BatchEncoder) -> None:
        while self._pending:
            viewer, request = next(iter(self._pending.items()))
            del self._pending[viewer]
            await self._send_history(conn, encoder, request)

    async def _send_history(self, conn: Connection, encoder: BatchEncoder, request: AddViewer) -> None:
        upto = self._sent_upto
        level = request.min_level
        with self._lock:
            held = [r for r in self._buffer if r.seq <= upto and r.level >= level]
            oldest = self._buffer[0].seq if self._buffer else self._next_seq
        first_seq = upto + 1
        if request.after_seq is not None:
            after = min(request.after_seq, upto)
            held = [r for r in held if r.seq > after]
            first_seq = after + 1
            if oldest > after + 1 and after < upto:
                gap_last = min(oldest - 1, upto)
                await conn.send(
                    GapNotice(
                        first_seq=after + 1,
                        last_seq=gap_last,
                        reason=GAP_HISTORY_UNAVAILABLE,
                        viewer=request.viewer,
                    )
                )
                first_seq = gap_last + 1
        else:
            held = held[-request.history :] if request.history else []
            if held:
                first_seq = held[0].seq
        # Cut into batches of about TARGET_RAW_BATCH raw bytes.
        chunks: list[list[Record]] = [[]]
        size = 0
        for record in held:
            if size >= TARGET_RAW_BATCH:
                chunks.append([])
                size = 0
            chunks[-1].append(record)
            size += _record_size(record)
        for index, chunk in enumerate(chunks):
            end = index == len(chunks) - 1
            chunk_first = chunk[0].seq if chunk and index else first_seq
            chunk_last = upto if end else chunks[index + 1][0].seq - 1
            batch = encoder.prepare_history(
                chunk, viewer=request.viewer, first_seq=chunk_first, last_seq=chunk_last, end=end
            )
            payload = await self._compress(encoder, batch)
            await conn.send_raw(encode_frame(FrameKind.BATCH, payload))
            self._records_sent += len(chunk)
            self._batches_sent += 1
            self._bytes_sent += len(payload) + 5

    # -- closing ---------------------------------------------------------------------

    async def _close(self) -> None:
        """Deliver what viewers are owed, say GOODBYE, wait for the relay to finish.

        Bounded by ``close_timeout`` in all.
        """
        self._closing = True
        self._wake.set()
        with trio.move_on_after(self._close_timeout):
            # A short-lived program: let its session at least register, so the
            # records it logged reach the relay's viewers (and captures).
            await self._first_attempt_done.wait()
            if self._stream_wanted.value is not None and self._viewers:
                # A viewer is known and its stream is starting: it is owed the
                # records, so let the stream come up before waiting for its end.
                await _wait_either(self._streaming, True, self._stream_wanted, None)
            await self._streaming.wait_value(False)
            control = self._control
            if control is not None:
                try:
                    # The final counters first: the session's end shows them all.
                    if self._counts_pending:
                        with self._lock:
                            self._counts_pending = False
                            counts = self._counts_locked()
                        await control.send(ReportCounts(counts=counts))
                    await control.send(Goodbye(reason="the session ended"))
                except ConnectionClosed:
                    return
                # The relay closes the connection once the session's data has
                # reached its viewers; a stream it asked for meanwhile is still
                # served (the control connection keeps reading commands).
                await self.connected.wait_value(False)


async def _wait_either(
    first: trio_util.AsyncValue[Any],
    first_value: object,
    second: trio_util.AsyncValue[Any],
    second_value: object,
) -> None:
    async with trio.open_nursery() as nursery:

        async def wait(value: trio_util.AsyncValue[Any], wanted: object) -> None:
            await value.wait_value(wanted)
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, first, first_value)
        nursery.start_soon(wait, second, second_value)


def default_session_info(
    *,
    app: str,
    app_version: str = "",
    environment: str | None = None,
    tags: Mapping[str, object] | None = None,
    session_id: str | None = None,
) -> SessionInfo:
    """Session information filled in from this process.

    ``environment`` defaults to ``$LOUPE_ENVIRONMENT``; the domain is the part
    of the host name after its first dot (no DNS lookup: that could block),
    or ``$USERDOMAIN``.
    """
    try:
        user = getpass.getuser()
    except Exception:  # getpass raises various errors without a user database
        user = ""
    host = socket.gethostname()
    domain = host.partition(".")[2]
    if not domain:
        domain = os.environ.get("USERDOMAIN", "")
    if environment is None:
        environment = os.environ.get("LOUPE_ENVIRONMENT", "")
    return SessionInfo(
        session_id=session_id or str(uuid.uuid4()),
        app=app,
        app_version=app_version,
        environment=environment[:1024],
        host=host[:1024],
        domain=domain[:1024],
        pid=os.getpid(),
        user=user[:1024],
        os=f"{platform.system()} {platform.release()}".strip()[:1024],
        runtime=f"{platform.python_implementation()} {platform.python_version()}",
        agent_version=f"loupelive {__version__}",
        started_at=time.time(),
        tags=dict(tags or {}),
    )


@contextlib.asynccontextmanager
async def open_agent(
    host: str = "127.0.0.1",
    port: int = DEFAULT_AGENT_PORT,
    *,
    app: str,
    app_version: str = "",
    environment: str | None = None,
    tags: Mapping[str, object] | None = None,
    session_id: str | None = None,
    token: str | None = None,
    tls: bool | ssl.SSLContext = False,
    ca_file: str | None = None,
    buffer_records: int = DEFAULT_BUFFER_RECORDS,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    quality: int = 5,
    max_delay: float = DEFAULT_MAX_DELAY,
    connector: Connector | None = None,
    sync_interval: float = DEFAULT_SYNC_INTERVAL,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    clock: Callable[[], float] = time.time,
    fallbacks: Sequence[tuple[str, int]] = (),
) -> AsyncIterator[Agent]:
    """Register a session with the relay at ``host:port`` and publish records to it.

    The first connection is made before the block starts, so an unreachable relay
    or a refused token raises here; later drops reconnect in the background.
    Leaving the block delivers what current viewers are owed (within
    ``close_timeout``), then ends the session.

    Args:
      app: the application's name, shown to viewers.
      environment: e.g. ``production``; defaults to ``$LOUPE_ENVIRONMENT``.
      session_id: defaults to a new UUID.
      token: the relay's agent token, if it requires one.
      tls: ``True`` for TLS with the system trust store (or ``ca_file``), or an
        ``ssl.SSLContext``.
      buffer_records, buffer_bytes: ring buffer bounds.
      quality: brotli quality 2..11.
      max_delay: seconds a batch may wait to fill (default 0: send at once
        when idle; a flood batches itself while sends are in flight).
      connector: ``async (host, port) -> trio.abc.Stream`` replacing TCP
        (e.g. :meth:`Relay.memory_connector` for in-process tests).
      clock: the wall clock for record timestamps and clock probes
        (``time.time``; tests pass a skewed one).
      fallbacks: more relays ``(host, port)`` of the same cluster: when the
        relay in use fails, the agent registers with the next one (and the
        first connection tries them in turn).

    Raises:
      OSError: the relay cannot be reached.
      HandshakeRejected: the relay refused the session (AuthenticationError for a
        bad token).
    """
    info = default_session_info(
        app=app, app_version=app_version, environment=environment, tags=tags, session_id=session_id
    )
    agent = Agent(
        host,
        port,
        info,
        token=token,
        tls=tls,
        ca_file=ca_file,
        buffer_records=buffer_records,
        buffer_bytes=buffer_bytes,
        quality=quality,
        max_delay=max_delay,
        connector=connector,
        sync_interval=sync_interval,
        close_timeout=close_timeout,
        clock=clock,
        fallbacks=fallbacks,
    )
    async with run_agent(agent) as running:
        yield running


@contextlib.asynccontextmanager
async def run_agent(agent: Agent, *, wait_connected: bool = True) -> AsyncIterator[Agent]:
    """Run an :class:`Agent` in the current Trio run for the duration of the block.

    With ``wait_connected`` (as :func:`open_agent` does), the block starts once
    the session is registered and a first connection error is raised;
    otherwise it starts at once and the agent connects in the background.
    """
    agent._trio_thread = threading.get_ident()
    agent._trio_token = trio.lowlevel.current_trio_token()
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(agent._serve_control, wait_connected=wait_connected))
            nursery.start_soon(agent._serve_streams)
            try:
                yield agent
            finally:
                with trio.CancelScope(shield=True):
                    await agent._close()
                nursery.cancel_scope.cancel()

"""The relay: listeners, the session registry, and one task tree per connection.

Theory of operation
-------------------
:func:`serve_relay` opens both listeners, reports the bound ports through
``task_status.started(relay)`` and then serves until cancelled.  Every accepted
connection runs :meth:`Relay._handle` in its own task: the TLS handshake (when
configured), the preamble and the HELLO, all under ``handshake_timeout``; then the
handler of its role, which opens a nursery for that connection's tasks (reader,
writer, heartbeats).  Whatever a peer does, its errors end in that handler: it is
logged, the peer is told why (REJECT or CLOSE with an :class:`ErrorCode`), the
stream is closed in ``finally``, and every other connection carries on.

A session (:class:`Session`) lives exactly as long as its agent's control
connection.  Commands to the agent go through the session's *outbox*, a memory
channel drained by a task of that control connection, so synchronous code (the
hub asking for a sync point) and viewer tasks never wait on a slow agent.

Streams are numbered.  The first viewer of a session makes the relay send
``START_STREAM n``; the agent opens a data connection naming ``n``; every viewer
joining sends ``ADD_VIEWER``.  When the last viewer leaves, a grace timer runs;
when it fires, ``STOP_STREAM n``.  If a data connection dies while viewers
remain, the relay starts stream ``n+1`` and re-adds each viewer with
``after_seq`` = the last seq it was given, so the agent resends exactly what is
missing (or a GAP for what it no longer holds).

Viewer control connections get the session list as one SESSION_ADDED per session
then SNAPSHOT_END, then live SESSION_ADDED / SESSION_CHANGED / SESSION_ENDED.
Each has a queue bounded by ``max_list_backlog`` beyond its snapshot; a viewer
that lets it overflow is disconnected (``slow_consumer``) rather than given a
list that silently diverges.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hmac
import itertools
import json
import logging
import math
import os
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final, Literal

import attrs
import trio
import trio.testing

from . import __version__
from ._util import collapse_groups, peer_name
from .config import RelayConfig
from .connection import Connection, Connector
from .errors import ConnectionClosed, ErrorCode, RemoteProtocolError, StreamDecodeError
from .hub import Hub, Subscriber, SubscriberState
from .messages import (
    AGENT_ROLES,
    VIEWER_ROLES,
    Accept,
    AddViewer,
    CountsEntry,
    GapNotice,
    GetStats,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    PauseList,
    Reject,
    RemoveViewer,
    ReportCounts,
    RequestSync,
    ResumeList,
    Role,
    SessionAdded,
    SessionChanged,
    SessionCounts,
    SessionEnded,
    SessionInfo,
    SnapshotBegin,
    SnapshotEnd,
    StartStream,
    Stats,
    StopStream,
    StreamEnd,
    decode_message,
    encode_message,
)
from .records import BatchHeader
from .wire import (
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    PROTOCOL_VERSION,
    FrameKind,
    encode_frame,
    encode_preamble,
)

__all__ = ["Relay", "RelayStatistics", "SessionStatistics", "ViewerStatistics", "serve_relay"]

log = logging.getLogger("loupelive.relay")

#: Commands waiting for one agent.  Commands are a few per viewer join or
#: leave; an agent that lets this many pile up is not reading and is dropped.
MAX_OUTBOX: Final = 10_000

#: Bytes gathered into one write to a viewer (NOTES.md: one ``send_all`` per
#: frame caps a connection at ~65k frames/s; batching writes lifts that).
WRITE_COALESCE: Final = 256 * 1024

#: At most one REQUEST_SYNC per session per this many seconds: a burst of
#: viewers joining or skipping needs only one sync point.
SYNC_REQUEST_INTERVAL: Final = 0.05

#: Record counters and clock estimates reach viewers' session lists at most
#: this often (seconds), one SESSION_COUNTS frame for every session that
#: changed: 10,000 busy sessions cost a viewer one update a second each, in
#: frames of up to COUNTS_PER_FRAME entries, not a flood of SESSION_CHANGED.
LIST_UPDATE_INTERVAL: Final = 1.0
#: Entries per SESSION_COUNTS frame (~150 bytes each: well inside a control frame).
COUNTS_PER_FRAME: Final = 512

#: Clock probes to an agent: a first series of CLOCK_PROBES_FIRST, this far
#: apart (seconds), for a quick estimate …
CLOCK_PROBES_FIRST: Final = 4
CLOCK_PROBE_SPACING: Final = 0.5
#: … then one every CLOCK_PROBE_INTERVAL seconds: clocks drift slowly, and an
#: idle session should cost little more than its heartbeats.
CLOCK_PROBE_INTERVAL: Final = 300.0
#: Samples kept per session; the estimate is the one with the smallest RTT
#: (NTP's clock filter: queueing delay only ever adds to a sample's error).
CLOCK_SAMPLES: Final = 8
#: Answers with a round trip longer than this (seconds) are not believed.
MAX_PROBE_RTT: Final = 30.0

#: Bytes of per-session detail in one STATS frame (the control frame limit is 256 KiB).
STATS_DETAIL_BUDGET: Final = 200 * 1024

PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: Failed handshakes from one address are remembered this long (seconds) …
FAILURE_MEMORY: Final = 60.0
#: … for at most this many addresses (oldest forgotten first) …
MAX_TRACKED_ADDRESSES: Final = 10_000
#: … and delay a rejection by at most this much.
MAX_FAILURE_DELAY: Final = 5.0

_FAILURE_CODES: Final = frozenset(
    {
        ErrorCode.BAD_TOKEN,
        ErrorCode.BAD_MAGIC,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.WRONG_ROLE,
        ErrorCode.MALFORMED,
        ErrorCode.UNEXPECTED_MESSAGE,
    }
)

_HTTP_400: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


#: Upper bounds of the records-per-batch histogram.
BATCH_SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@attrs.define
class Histogram:
    """Cumulative bucket counts, like a Prometheus histogram, without the library."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0
    samples: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += value
        self.samples += 1
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1

    def buckets(self) -> list[tuple[str, int]]:
        """``(upper bound, cumulative count)`` pairs, ending with ``+Inf``."""
        return [(str(bound), count) for bound, count in zip(self.bounds, self.counts, strict=True)] + [
            ("+Inf", self.samples)
        ]


@attrs.frozen(kw_only=True)
class RelayStatistics:
    """A snapshot of what the relay is doing (see :meth:`Relay.statistics`)."""

    uptime: float
    sessions: int
    streaming_sessions: int
    #: Sessions whose agent is away, within their grace period.
    disconnected_sessions: int
    agent_connections: int
    agent_data_connections: int
    viewer_connections: int
    viewer_streams: int
    batches_in: int
    records_in: int
    bytes_in: int
    bytes_out: int
    #: Uncompressed size of the records that came in (bytes_in / this: the
    #: compression ratio on the wire).
    raw_bytes_in: int
    records_dropped: int
    batches_dropped: int
    gaps_sent: int
    #: Gaps sent to viewers, by reason (viewer_slow, agent_overflow, …).
    gaps_by_reason: dict[str, int]
    slow_consumer_disconnects: int
    queued_bytes: int
    #: Handshakes refused and connections closed for cause, by error code.
    rejected: dict[str, int]
    #: Open connections (all roles, handshakes included).
    connections: int
    #: Resident memory of the relay's process (0 where unknown).
    rss_bytes: int
    #: Per session, with ``statistics(detail=True)``; empty otherwise.
    session_details: tuple[SessionStatistics, ...] = ()
    #: In a cluster: peers, remote sessions, feed traffic, overflows (see
    #: ``Cluster.statistics``); empty for a single relay.
    cluster: dict[str, Any] = attrs.Factory(dict)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class ViewerStatistics:
    """One viewer of one session (a viewer data connection)."""

    viewer: int
    state: str
    queued_bytes: int
    bytes_out: int
    records_offered: int
    records_dropped: int
    batches_dropped: int
    gaps: int


@attrs.frozen(kw_only=True)
class SessionStatistics:
    """One session: what came in from its agent and went out to its viewers."""

    session_id: str
    app: str
    streaming: bool
    batches_in: int
    records_in: int
    bytes_in: int
    bytes_out: int
    records_dropped: int
    batches_dropped: int
    gaps_sent: int
    slow_consumer_disconnects: int
    queued_bytes: int
    viewers: tuple[ViewerStatistics, ...]


@attrs.define(eq=False)
class Session:
    """A live session: its agent's control connection, its hub, its stream."""

    info: SessionInfo
    relay: Relay
    #: The per-session secret its agent registered with: only it may take the
    #: session over after a reconnect.  Empty: nobody can.
    secret: str = attrs.field(default="", repr=False)
    #: The agent's control connection; None while disconnected.
    control: Connection | None = None
    #: Set when the current control connection is replaced or lost.
    detached: trio.Event = attrs.Factory(trio.Event)
    #: Set (and renewed) each time an agent connection attaches.
    reattached: trio.Event = attrs.Factory(trio.Event)
    attachments: int = 0
    disconnected_at: float = 0.0
    hub: Hub = attrs.field(init=False)
    outbox_send: trio.MemorySendChannel[Message] = attrs.field(init=False)
    outbox_receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)
    stream_no: int = 0
    stream_key: str = attrs.field(default="", repr=False)
    stream_wanted: bool = False
    data_conn: Connection | None = None
    data_scope: trio.CancelScope | None = None
    data_done: trio.Event = attrs.Factory(trio.Event)
    grace_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    ended: bool = False
    #: The agent said GOODBYE: no more commands, its data is draining.
    closing: bool = False
    last_sync_request: float = -math.inf
    sync_request_pending: bool = False
    slow_disconnects: int = 0
    #: Clock probes sent to the current agent connection (their times) …
    probes: collections.deque[float] = attrs.Factory(lambda: collections.deque(maxlen=CLOCK_PROBES_FIRST))
    #: … and the (rtt, offset) samples their answers gave.
    clock_samples: collections.deque[tuple[float, float]] = attrs.Factory(
        lambda: collections.deque(maxlen=CLOCK_SAMPLES)
    )

    def __attrs_post_init__(self) -> None:
        self.hub = Hub(request_sync=self.request_sync, name=f"session {self.info.session_id}")
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[Message](MAX_OUTBOX)

    @property
    def session_id(self) -> str:
        return self.info.session_id

    def attach(self, conn: Connection, info: SessionInfo) -> None:
        """Make ``conn`` this session's control connection (first or again)."""
        self.control = conn
        # The agent's registration, with the relay's fields kept: the counters
        # carry on over a reconnect; the clock is measured again (the path
        # may have changed).
        old = self.info
        self.info = attrs.evolve(
            info.registration(),
            connected_at=time.time(),
            records=old.records,
            critical=old.critical,
            errors=old.errors,
            warnings=old.warnings,
            last_record_at=old.last_record_at,
        )
        self.probes.clear()
        self.clock_samples.clear()
        self.attachments += 1
        self.disconnected_at = 0.0
        self.detached = trio.Event()
        self.outbox_send.close()
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[Message](MAX_OUTBOX)
        self.reattached.set()
        self.reattached = trio.Event()

    async def detach(self, reason: str) -> None:
        """Let go of the current control connection (it is being replaced)."""
        old = self.control
        if old is None:
            return
        self.control = None
        self.detached.set()
        log.info("session %s: %s", self.session_id, reason)
        await old.aclose(ErrorCode.SESSION_CONFLICT, reason)

    def resume_viewers(self) -> None:
        """After the agent came back: restart its stream for the waiting viewers."""
        if self.attachments == 1:
            return
        self.stream_wanted = False
        if self.hub.subscribers or self.remote_viewers():
            self.ensure_stream()
            for sub in self.hub.subscribers.values():
                self.command(self.hub.restart(sub))
        self._restart_feeds()

    def _restart_feeds(self) -> None:
        # Watching relays re-add their viewers from where each one is.
        for feed in self.hub.feeds.values():
            feed.restart()

    @property
    def status(self) -> str:
        # After a GOODBYE the agent's connection is going, but nothing is
        # wrong: the session is ending, not disconnected.
        return "running" if self.control is not None or self.closing else "disconnected"

    def set_counts(self, report: ReportCounts) -> None:
        """The agent reported its counters."""
        self.info = self.info.with_counts(report.counts)
        self.relay._counts_changed(self)

    def clock_answer(self, heartbeat: Heartbeat) -> None:
        """An agent answered a clock probe: take a sample, update the estimate.

        With the probe sent at ``t0`` (relay clock), received at ``t1`` and
        answered at ``t1 + hold`` (agent clock), and the answer received at
        ``t3``: ``rtt = t3 - t0 - hold`` and
        ``offset = ((t1 - t0) + (t1 + hold - t3)) / 2``, exact when both
        directions take as long.
        """
        received = time.time()
        if heartbeat.echo not in self.probes:
            return  # not a probe of ours (or a very late answer)
        self.probes.remove(heartbeat.echo)
        rtt = received - heartbeat.echo - heartbeat.hold
        if not 0.0 <= rtt <= MAX_PROBE_RTT:
            return
        offset = ((heartbeat.time - heartbeat.echo) + (heartbeat.time + heartbeat.hold - received)) / 2
        self.clock_samples.append((rtt, offset))
        best_rtt, best_offset = min(self.clock_samples)
        if (best_offset, best_rtt) != (self.info.clock_offset, self.info.rtt):
            # Only a better estimate is news for the viewers' lists.
            self.info = attrs.evolve(self.info, clock_offset=best_offset, rtt=best_rtt)
            self.relay._counts_changed(self)

    def counts_entry(self) -> CountsEntry:
        return CountsEntry.of(self.info)

    def command(self, message: Message) -> None:
        """Queue a command for the agent; drops the agent if it is not reading."""
        if self.closing or self.ended or self.control is None:
            return
        try:
            self.outbox_send.send_nowait(message)
        except trio.WouldBlock:
            log.warning("session %s: agent is not reading its commands; dropping it", self.session_id)
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _spawn(self, async_fn: Callable[[], Awaitable[None]]) -> bool:
        """Start a task in the session's nursery, unless the session is over."""
        if self.nursery is None or self.closing or self.ended:
            return False
        try:
            self.nursery.start_soon(async_fn)
        except RuntimeError:  # the nursery is closing: the session is ending
            return False
        return True

    def request_sync(self) -> None:
        now = trio.current_time()
        if now - self.last_sync_request >= SYNC_REQUEST_INTERVAL:
            self.last_sync_request = now
            self.command(RequestSync())
        elif not self.sync_request_pending and self._spawn(self._delayed_sync_request):
            self.sync_request_pending = True

    async def _delayed_sync_request(self) -> None:
        await trio.sleep_until(self.last_sync_request + SYNC_REQUEST_INTERVAL)
        self.sync_request_pending = False
        self.last_sync_request = trio.current_time()
        self.command(RequestSync())

    def public_info(self) -> SessionInfo:
        cluster = self.relay.cluster
        return attrs.evolve(
            self.info,
            viewers=len(self.hub.subscribers) + self.remote_viewers(),
            streaming=self.data_conn is not None,
            status=self.status,
            relay=cluster.name if cluster is not None else "",
        )

    def remote_viewers(self) -> int:
        """Viewers on other relays of a cluster (through feeds)."""
        return sum(len(feed.ids) for feed in self.hub.feeds.values())

    def remove_remote_viewer(self, viewer_id: int) -> None:
        self.command(RemoveViewer(viewer=viewer_id))
        self.maybe_stop_stream()

    def maybe_stop_stream(self) -> None:
        """Nobody watches any more (here or through feeds): stop after the grace period."""
        if not self.hub.subscribers and not self.remote_viewers() and self.stream_wanted:
            self._spawn(self._grace_then_stop)

    def ensure_stream(self) -> None:
        if self.grace_scope is not None:
            self.grace_scope.cancel()
            self.grace_scope = None
        if not self.stream_wanted:
            self.stream_no += 1
            self.stream_wanted = True
            self.stream_key = secrets.token_urlsafe(18)
            self.data_done = trio.Event()
            self.command(StartStream(stream=self.stream_no, key=self.stream_key))

    def add_subscriber(self, hello: Hello) -> Subscriber:
        sub = self.relay.new_subscriber(self.hub, hello)
        self.ensure_stream()
        self.command(sub.request)
        self.relay._changed(self)
        return sub

    def remove_subscriber(self, sub: Subscriber) -> None:
        if self.hub.subscribers.pop(sub.id, None) is None:
            return
        sub.send_channel.close()
        if self.ended:
            return
        self.command(RemoveViewer(viewer=sub.id))
        self.maybe_stop_stream()
        self.relay._changed(self)

    async def _grace_then_stop(self) -> None:
        with trio.CancelScope() as scope:
            if self.grace_scope is not None:
                self.grace_scope.cancel()
            self.grace_scope = scope
            await trio.sleep(self.relay.config.stream_grace)
            if not self.hub.subscribers and not self.remote_viewers() and self.stream_wanted:
                self.stream_wanted = False
                self.command(StopStream(stream=self.stream_no))
                log.info("session %s: no viewers left, stream %d stopped", self.session_id, self.stream_no)
        if self.grace_scope is scope:
            self.grace_scope = None

    def data_ended(self, conn: Connection, stream_no: int, end: StreamEnd | None) -> None:
        """A data connection of this session finished (cleanly or not)."""
        if self.data_conn is conn:
            self.data_conn = None
            self.data_scope = None
            self.data_done.set()
            self.relay._changed(self)
        if self.ended or stream_no != self.stream_no:
            return
        if end is not None and end.code is ErrorCode.SESSION_ENDED:
            return
        # The current stream ended early (the agent's data connection broke or
        # the agent stopped it while we still have viewers): start a new one
        # and re-ask for each viewer from where it stopped.
        self.stream_wanted = False
        if self.hub.subscribers or self.remote_viewers():
            log.info("session %s: stream %d ended with viewers left; restarting", self.session_id, stream_no)
            self.ensure_stream()
            for sub in self.hub.subscribers.values():
                self.command(self.hub.restart(sub))
            self._restart_feeds()


@attrs.define(eq=False)
class _ListListener:
    """One viewer control connection's queue of session-list frames."""

    send_channel: trio.MemorySendChannel[bytes]
    receive_channel: trio.MemoryReceiveChannel[bytes]
    limit: int
    queued: int = 0
    overflowed: bool = False
    #: The viewer asked for no updates (PAUSE_LIST) until RESUME_LIST.
    paused: bool = False
    #: A counts update was skipped because the viewer was behind: it gets
    #: every session's counters once it has caught up.
    counts_stale: bool = False

    def put(self, frame: bytes, *, force: bool = False) -> None:
        if self.overflowed:
            return
        if self.queued >= self.limit and not force:
            self.overflowed = True
            self.send_channel.close()
            return
        try:
            self.send_channel.send_nowait(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the viewer is going away; its handler unsubscribes it
        self.queued += 1


class Relay:
    """A running relay: what :func:`serve_relay` hands to ``task_status.started``.

    Attributes:
      config: the configuration it runs with.
      agent_port: the bound agent port (useful with port 0).
      viewer_port: the bound viewer port.
    """

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.agent_port = 0
        self.viewer_port = 0
        self.sessions: dict[str, Session] = {}
        self._listeners: set[_ListListener] = set()
        #: The web viewer (loupelive.web.WebGateway) when serving one.
        self.web: Any = None
        #: Cluster membership (loupelive.cluster.Cluster) with ``cluster`` configured.
        self.cluster: Any = None
        #: Sessions whose counters or clock changed since the last list update.
        self._dirty: dict[str, Session] = {}
        self._viewer_ids = itertools.count(1)
        self._started = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._listening: trio.CancelScope | None = None
        self._shutting_down = False
        #: Agent and viewer control connections, told when the relay goes away.
        self._control_connections: set[Connection] = set()
        #: Records per batch received from agents (for metrics).
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self._counts = {
            "agent_connections": 0,
            "agent_data_connections": 0,
            "viewer_connections": 0,
            "viewer_streams": 0,
        }
        self._rejected: dict[str, int] = {}
        self._bytes_out = 0
        # Totals of sessions that ended, so relay counters never go backwards.
        self._closed_hub_totals = dict.fromkeys(
            (
                "batches_in",
                "records_in",
                "bytes_in",
                "raw_bytes_in",
                "records_dropped",
                "batches_dropped",
                "gaps_sent",
            ),
            0,
        )
        self._closed_gaps: dict[str, int] = {}
        self._slow_disconnects = 0
        self._ssl_contexts: dict[frozenset[Role], ssl.SSLContext] = {}
        self._agent_token: str | None = None
        self._viewer_token: str | None = None
        self._connections_by_address: collections.Counter[str] = collections.Counter()
        self._connections = 0
        self._failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self.reload()

    # -- statistics --------------------------------------------------------------

    def statistics(self, *, detail: bool = False) -> RelayStatistics:
        """Counters and gauges of the whole relay (and per session with ``detail``)."""
        totals = dict(self._closed_hub_totals)
        gaps = dict(self._closed_gaps)
        queued = 0
        for session in self.sessions.values():
            hub = session.hub
            for key in totals:
                totals[key] += getattr(hub, key)
            for reason, count in hub.gaps_by_reason.items():
                gaps[reason] = gaps.get(reason, 0) + count
            queued += hub.queued_bytes
        return RelayStatistics(
            uptime=time.monotonic() - self._started,
            sessions=len(self.sessions),
            streaming_sessions=sum(1 for s in self.sessions.values() if s.data_conn is not None),
            disconnected_sessions=sum(1 for s in self.sessions.values() if s.control is None),
            gaps_by_reason=gaps,
            connections=self._connections,
            rss_bytes=_rss_bytes(),
            agent_connections=self._counts["agent_connections"],
            agent_data_connections=self._counts["agent_data_connections"],
            viewer_connections=self._counts["viewer_connections"],
            viewer_streams=self._counts["viewer_streams"],
            bytes_out=self._bytes_out,
            slow_consumer_disconnects=self._slow_disconnects,
            queued_bytes=queued,
            rejected=dict(self._rejected),
            session_details=tuple(self._session_statistics(s) for s in self.sessions.values())
            if detail
            else (),
            cluster=self.cluster.statistics() if self.cluster is not None else {},
            **totals,
        )

    def _stats_for_wire(self, detail: bool) -> dict[str, Any]:
        """``statistics()`` as JSON that fits one control frame."""
        stats = self.statistics(detail=detail).to_json()
        details = list(stats.pop("session_details"))
        if detail:
            # The busiest sessions first, as many as fit a frame.
            details.sort(key=lambda d: d["bytes_in"], reverse=True)
            kept, size = [], 0
            for item in details:
                size += len(json.dumps(item))
                if size > STATS_DETAIL_BUDGET:
                    break
                kept.append(item)
            stats["session_details"] = kept
            stats["session_details_truncated"] = len(kept) < len(details)
        return stats

    @staticmethod
    def _session_statistics(session: Session) -> SessionStatistics:
        hub = session.hub
        return SessionStatistics(
            session_id=session.session_id,
            app=session.info.app,
            streaming=session.data_conn is not None,
            batches_in=hub.batches_in,
            records_in=hub.records_in,
            bytes_in=hub.bytes_in,
            bytes_out=hub.bytes_out,
            records_dropped=hub.records_dropped,
            batches_dropped=hub.batches_dropped,
            gaps_sent=hub.gaps_sent,
            slow_consumer_disconnects=session.slow_disconnects,
            queued_bytes=hub.queued_bytes,
            viewers=tuple(
                ViewerStatistics(
                    viewer=sub.id,
                    state=sub.state.value,
                    queued_bytes=sub.queued_bytes,
                    bytes_out=sub.bytes_written,
                    records_offered=sub.records_offered,
                    records_dropped=sub.records_dropped,
                    batches_dropped=sub.batches_dropped,
                    gaps=sub.gaps,
                )
                for sub in hub.subscribers.values()
            ),
        )

    # -- session list -------------------------------------------------------------

    def _broadcast(self, message: Message, *, local: bool = True) -> None:
        """Send a list message to every viewer (and, for our own sessions, to the cluster)."""
        frame = encode_message(message)
        for listener in self._listeners:
            if not listener.paused:
                listener.put(frame)
        if (
            local
            and self.cluster is not None
            and isinstance(message, (SessionAdded, SessionChanged, SessionEnded))
        ):
            self.cluster.publish_session(message)

    def new_subscriber(self, hub: Hub, hello: Hello) -> Subscriber:
        """A viewer of ``hub`` (a local or a remote session), with a new viewer id."""
        viewer_id = next(self._viewer_ids)
        request = AddViewer(
            viewer=viewer_id,
            history=hello.history,
            min_level=hello.min_level,
            after_seq=hello.after_seq,
        )
        config = self.config
        sub = Subscriber(
            id=viewer_id,
            request=request,
            budget=config.viewer_queue_bytes,
            max_loss=config.slow_viewer_max_loss,
            min_records=config.slow_viewer_min_records,
        )
        hub.subscribers[viewer_id] = sub
        return sub

    def all_sessions(self) -> list[Any]:
        """Our sessions, then (in a cluster) those other relays hold."""
        sessions: list[Any] = list(self.sessions.values())
        if self.cluster is not None:
            sessions.extend(self.cluster.remote.values())
        return sessions

    def find_session(self, session_id: str) -> Any:
        """A live session by id, ours or (in a cluster) another relay's; None if unknown."""
        session = self.sessions.get(session_id)
        if session is None and self.cluster is not None:
            session = self.cluster.remote.get(session_id)
        return session

    def _changed(self, session: Session) -> None:
        if not session.ended and self.sessions.get(session.session_id) is session:
            self._broadcast(SessionChanged(session=session.public_info()))
            # The full information carries the counters too.
            self._dirty.pop(session.session_id, None)

    def _counts_changed(self, session: Session) -> None:
        """Counters or clock changed: in the next list update (see LIST_UPDATE_INTERVAL)."""
        if not session.ended:
            self._dirty[session.session_id] = session

    @staticmethod
    def _counts_frames(sessions: Iterable[Session]) -> bytes:
        entries = [session.counts_entry() for session in sessions]
        return b"".join(
            encode_message(SessionCounts(counts=tuple(entries[i : i + COUNTS_PER_FRAME])))
            for i in range(0, len(entries), COUNTS_PER_FRAME)
        )

    def flush_counts(self) -> None:
        """Send the counters of the sessions that changed to every viewer's list.

        A viewer still behind on its list (frames queued) skips the update and
        gets every session's counters once caught up: counters are state, so
        only the newest matter.  Paused viewers get a fresh snapshot on resume.
        """
        dirty = [s for s in self._dirty.values() if not s.ended and self.find_session(s.session_id) is s]
        self._dirty.clear()
        if self.cluster is not None:
            own = [s.counts_entry() for s in dirty if s.session_id in self.sessions]
            if own:
                self.cluster.publish_counts(own)
        if all(listener.paused for listener in self._listeners):
            return  # nobody to tell (paused viewers get a snapshot on resume)
        frames = self._counts_frames(dirty) if dirty else b""
        full: bytes | None = None
        for listener in self._listeners:
            if listener.paused:
                continue
            if listener.queued > 0:
                listener.counts_stale = True
                continue
            if listener.counts_stale:
                if full is None:
                    full = self._counts_frames(self.all_sessions())
                listener.counts_stale = False
                if full:
                    listener.put(full)
            elif frames:
                listener.put(frames)

    async def _serve_list_updates(self) -> None:
        while True:
            await trio.sleep(LIST_UPDATE_INTERVAL)
            self.flush_counts()

    # -- connections ---------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` has begun."""
        return self._shutting_down

    async def shutdown(self, grace: float = 5.0) -> None:
        """Shut down gracefully, in two phases; cancel ``serve_relay`` afterwards.

        1. Stop accepting connections, and tell every agent and viewer that the
           relay is going away (CLOSE / STREAM_END ``shutdown``), so they start
           reconnecting at once (to this relay's successor) and resume without
           loss by the usual rules.
        2. Give viewers up to ``grace`` seconds to receive what is queued for
           them; then return.
        """
        if self._listening is not None:
            self._listening.cancel()
        self._shutting_down = True
        log.info("shutting down: telling %d sessions and their viewers", len(self.sessions))
        viewers = [sub for session in self.sessions.values() for sub in session.hub.subscribers.values()]
        for session in list(self.sessions.values()):
            session.hub.end_all(ErrorCode.SHUTDOWN, "the relay is shutting down")
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                for conn in list(self._control_connections):
                    nursery.start_soon(conn.aclose, ErrorCode.SHUTDOWN, "the relay is shutting down")
                for sub in viewers:
                    # Set once its writer has sent everything, STREAM_END last.
                    nursery.start_soon(sub.done.wait)

    def reload(self) -> None:
        """(Re)read the token files and the TLS certificate, key and client CA.

        New connections use what was read; established ones keep going.  Called
        at start and on SIGHUP by ``serve``.

        Raises:
          OSError: a file cannot be read (the previous settings stay).
          ssl.SSLError: the certificate or key is invalid (likewise).
        """
        config = self.config
        agent_token = config.agent_token or _read_token(config.agent_token_file)
        viewer_token = config.viewer_token or _read_token(config.viewer_token_file)
        contexts: dict[frozenset[Role], ssl.SSLContext] = {}
        if config.tls_cert is not None:
            for roles, port in ((AGENT_ROLES, "agent"), (VIEWER_ROLES, "viewer")):
                mutual = config.tls_client_ca is not None and config.tls_client_ca_ports in ("both", port)
                contexts[roles] = make_server_ssl_context(
                    config.tls_cert, config.tls_key, client_ca=config.tls_client_ca if mutual else None
                )
        self._agent_token, self._viewer_token = agent_token, viewer_token
        self._ssl_contexts = contexts

    def memory_connector(self, port: Literal["agent", "viewer"]) -> Connector:
        """A ``connector`` for clients that reaches this relay over in-memory streams.

        For tests in one Trio run: no sockets, so a ``MockClock`` with autojump
        drives every timer of relay and clients in virtual time.  Only for a
        relay started with :func:`serve_relay` (its connections run there).
        """
        handler = self.handle_agent_connection if port == "agent" else self.handle_viewer_connection

        async def connect(host: str, port_number: int) -> trio.abc.Stream:
            if self._nursery is None:
                raise RuntimeError("memory_connector() needs a relay started with serve_relay()")
            # Lockstep: a write completes only as the peer reads it, so a
            # client that stops reading pushes back as it would over TCP.
            client, server = trio.testing.lockstep_stream_pair()
            self._nursery.start_soon(handler, server)
            return client

        return connect

    def local_connector(self) -> Connector:
        """A viewer-port ``connector`` for parts of the relay's own process (the web viewer).

        In-memory lockstep streams (a reader that stops pushes back, as over
        TCP), without TLS: nothing leaves the process.  Tokens still apply.
        """

        async def connect(host: str, port_number: int) -> trio.abc.Stream:
            if self._nursery is None:
                raise RuntimeError("local_connector() needs a relay started with serve_relay()")
            client, server = trio.testing.lockstep_stream_pair()
            self._nursery.start_soon(functools.partial(self._handle, VIEWER_ROLES, server, local=True))
            return client

        return connect

    async def handle_agent_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection to the agent port (any Trio stream; TLS is added here)."""
        await self._handle(AGENT_ROLES, stream)

    async def handle_viewer_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection to the viewer port (any Trio stream; TLS is added here)."""
        await self._handle(VIEWER_ROLES, stream)

    async def _handle(
        self, port_roles: frozenset[Role], stream: trio.abc.Stream, *, local: bool = False
    ) -> None:
        peer = "local" if local else peer_name(stream)
        address = peer.rpartition(":")[0] or peer
        config = self.config
        if (
            self._connections >= config.max_connections
            or self._connections_by_address[address] >= config.max_connections_per_address
        ):
            self._reject_count(ErrorCode.LIMIT_REACHED)
            log.warning("%s: refused: connection limit reached", peer)
            with (
                trio.move_on_after(1.0),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                if not self._ssl_contexts:
                    reject = Reject(code=ErrorCode.LIMIT_REACHED, reason="too many connections")
                    await stream.send_all(encode_preamble() + encode_message(reject))
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        self._connections_by_address[address] += 1
        try:
            await self._handle_counted(port_roles, stream, peer, local=local)
        finally:
            self._connections -= 1
            self._connections_by_address[address] -= 1
            if not self._connections_by_address[address]:
                del self._connections_by_address[address]

    async def _handle_counted(
        self, port_roles: frozenset[Role], stream: trio.abc.Stream, peer: str, *, local: bool = False
    ) -> None:
        context = None if local else self._ssl_contexts.get(port_roles)
        if context is not None:
            stream = trio.SSLStream(stream, context, server_side=True)
        conn = Connection(
            stream, max_payload=MAX_CONTROL_PAYLOAD, name=peer, send_timeout=self.config.send_timeout
        )
        try:
            try:
                hello = await self._handshake(conn, port_roles, peer)
            except Exception:
                # A bug in the handshake: this connection goes, everyone else stays.
                log.exception("%s: internal error during the handshake", peer)
                return
            if hello is None:
                return
            conn.name = f"{hello.role.value} {peer}"
            if hello.role in (Role.AGENT_CONTROL, Role.VIEWER_CONTROL):
                self._control_connections.add(conn)
            handler = {
                Role.AGENT_CONTROL: self._serve_agent_control,
                Role.AGENT_DATA: self._serve_agent_data,
                Role.VIEWER_CONTROL: self._serve_viewer_control,
                Role.VIEWER_DATA: self._serve_viewer_data,
            }[hello.role]
            async with _peer_errors(conn):
                with collapse_groups():
                    await handler(conn, hello)
        finally:
            self._control_connections.discard(conn)
            await conn.aclose()

    def _reject_count(self, code: ErrorCode) -> None:
        self._rejected[code.value] = self._rejected.get(code.value, 0) + 1

    async def _failure_delay(self, peer: str) -> None:
        """Count a failed handshake from ``peer``'s address; slow repeat offenders."""
        address = peer.rpartition(":")[0] or peer
        now = trio.current_time()
        count, last = self._failures.pop(address, (0, now))
        if now - last > FAILURE_MEMORY:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)
        excess = count - self.config.auth_failures_before_delay
        if excess > 0:
            await trio.sleep(min(0.1 * 2 ** min(excess, 10), MAX_FAILURE_DELAY))

    async def _reject(self, conn: Connection, code: ErrorCode, reason: str) -> None:
        self._reject_count(code)
        log.warning("%s: rejected (%s): %s", conn.name, code.value, reason)
        if code in _FAILURE_CODES:
            await self._failure_delay(conn.name.rpartition(" ")[2])
        with trio.move_on_after(1.0):
            try:
                await conn.send_raw(encode_preamble() + encode_message(Reject(code=code, reason=reason)))
            except ConnectionClosed:
                pass

    async def _handshake(self, conn: Connection, port_roles: frozenset[Role], peer: str) -> Hello | None:
        """Preamble and HELLO, checked.  Returns None after rejecting the peer."""
        try:
            with trio.fail_after(self.config.handshake_timeout):
                if isinstance(conn.stream, trio.SSLStream):
                    try:
                        await conn.stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        self._reject_count(ErrorCode.BAD_MAGIC)
                        log.warning("%s: TLS handshake failed: %s", peer, exc.__cause__ or exc)
                        return None
                version = await conn.receive_preamble()
                frame = await conn.receive()
        except trio.TooSlowError:
            self._reject_count(ErrorCode.TIMEOUT)
            log.warning("%s: no handshake within %g s", peer, self.config.handshake_timeout)
            return None
        except RemoteProtocolError as exc:
            if exc.code is ErrorCode.HTTP_REQUEST:
                self._reject_count(exc.code)
                log.warning("%s: HTTP request on a loupelive port", peer)
                kind = "agents" if Role.AGENT_CONTROL in port_roles else "viewers"
                body = (
                    f"This is a loupelive relay port for {kind}; it speaks the loupelive "
                    "protocol, not HTTP.\n"
                ).encode()
                with trio.move_on_after(1.0):
                    try:
                        await conn.send_raw(_HTTP_400 % (len(body), body))
                    except ConnectionClosed:
                        pass
                return None
            if exc.code is ErrorCode.TLS_ON_PLAINTEXT:
                self._reject_count(exc.code)
                log.warning("%s: TLS ClientHello on a plaintext port (client has TLS on, relay not)", peer)
                return None
            await self._reject(conn, exc.code, str(exc))
            return None
        except ConnectionClosed as exc:
            log.info("%s: closed during handshake: %s", peer, exc.reason)
            return None
        if version != PROTOCOL_VERSION:
            await self._reject(
                conn,
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported; this relay speaks {PROTOCOL_VERSION}",
            )
            return None
        if frame.kind is not FrameKind.HELLO:
            await self._reject(conn, ErrorCode.UNEXPECTED_MESSAGE, f"expected HELLO, got {frame.kind.name}")
            return None
        try:
            hello = decode_message(frame)
        except RemoteProtocolError as exc:
            await self._reject(conn, exc.code, str(exc))
            return None
        assert isinstance(hello, Hello)
        if hello.role not in port_roles:
            port = "agent" if Role.AGENT_CONTROL in port_roles else "viewer"
            await self._reject(
                conn, ErrorCode.WRONG_ROLE, f"role {hello.role.value} is not served on the {port} port"
            )
            return None
        expected = self._agent_token if hello.role in AGENT_ROLES else self._viewer_token
        if expected is not None and not hmac.compare_digest((hello.token or "").encode(), expected.encode()):
            await self._reject(conn, ErrorCode.BAD_TOKEN, "missing or wrong token")
            return None
        return hello

    async def _accept(self, conn: Connection, session: SessionInfo | None = None) -> None:
        accept = Accept(
            relay=f"loupelive/{__version__}",
            heartbeat_interval=self.config.heartbeat_interval,
            session=session,
        )
        await conn.send_raw(encode_preamble() + encode_message(accept))

    async def _heartbeats(self, conn: Connection) -> None:
        await conn.serve_heartbeats(self.config.heartbeat_interval, self.config.heartbeat_timeout)

    # -- agents ------------------------------------------------------------------------

    async def _serve_agent_control(self, conn: Connection, hello: Hello) -> None:
        """Register (or take over) a session and serve its agent's commands.

        A session outlives a lost control connection by ``agent_grace``: it is
        shown as ``disconnected`` and its viewers keep waiting; the agent that
        reconnects with the session's secret takes it back, and the viewers'
        streams resume from where they were.  A GOODBYE ends it at once.
        """
        if hello.session is None:
            await self._reject(conn, ErrorCode.MALFORMED, "agent_control HELLO needs a session")
            return
        session_id = hello.session.session_id
        session = self.sessions.get(session_id)
        if session is not None:
            if not session.secret or not hmac.compare_digest(
                (hello.secret or "").encode(), session.secret.encode()
            ):
                await self._reject(
                    conn,
                    ErrorCode.SESSION_CONFLICT,
                    f"session {session_id} is live; only its own agent (with the session's secret) may take it over",
                )
                return
            await session.detach(f"replaced by a new connection from {conn.name}")
        else:
            if len(self.sessions) >= self.config.max_sessions:
                await self._reject(conn, ErrorCode.LIMIT_REACHED, "the relay holds its maximum of sessions")
                return
            session = Session(info=hello.session, relay=self, secret=hello.secret or "")
            self.sessions[session_id] = session
        session.attach(conn, hello.session)
        # What belongs to this attachment, taken before any await: another
        # connection may take the session over while we are still accepting.
        outbox, detached = session.outbox_receive, session.detached
        self._counts["agent_connections"] += 1
        info = session.info
        log.info(
            "session %s %s: app=%r host=%r pid=%d (%s)",
            session_id,
            "registered" if session.attachments == 1 else "reconnected",
            info.app,
            info.host,
            info.pid,
            conn.name,
        )
        if session.attachments == 1:
            if self.cluster is not None and session_id in self.cluster.remote:
                # Its agent moved here from another relay of the cluster:
                # our viewers of it are served locally from now on.
                self.cluster.adopt(session)
                self._broadcast(SessionChanged(session=session.public_info()))
            else:
                self._broadcast(SessionAdded(session=session.public_info()))
        else:
            self._changed(session)
        goodbye: Goodbye | None = None
        try:
            async with _peer_errors(conn):
                await self._accept(conn, session.public_info())
                if session.control is conn:
                    session.resume_viewers()
                    goodbye = await self._run_agent_control(conn, session, outbox, detached)
        finally:
            self._counts["agent_connections"] -= 1
            detached.set()
            if session.control is conn:
                session.control = None
            if goodbye is None and session.control is None and not session.ended:
                # Cancelled (relay shutdown) or a lost connection: the session
                # ends, now or after its grace period.
                session.disconnected_at = time.time()
        if goodbye is not None:
            session.closing = True
            if session.data_conn is not None or session.stream_wanted:
                # Let the data connection (perhaps still on its way) deliver
                # what viewers are owed; the agent keeps its control connection
                # open until we close it.
                with trio.move_on_after(self.config.end_flush_timeout):
                    await session.data_done.wait()
            self._end_session(session, ErrorCode.SESSION_ENDED, goodbye.reason or "the session ended")
            return
        if session.control is not None or session.ended:
            return  # taken over by a new connection
        await conn.aclose()
        self._changed(session)
        log.info(
            "session %s disconnected; ending it in %g s unless its agent returns",
            session_id,
            self.config.agent_grace,
        )
        try:
            with trio.move_on_after(self.config.agent_grace):
                await session.reattached.wait()
        finally:
            if session.control is None:
                self._end_session(session, ErrorCode.AGENT_LOST, "the agent's connection was lost")

    async def _run_agent_control(
        self,
        conn: Connection,
        session: Session,
        outbox: trio.MemoryReceiveChannel[Message],
        detached: trio.Event,
    ) -> Goodbye | None:
        """Heartbeats, commands out, GOODBYE in; returns the GOODBYE.

        Returns None if another connection took the session over.
        """
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                session.nursery = nursery
                nursery.start_soon(self._heartbeats, conn)
                nursery.start_soon(self._drain_outbox, conn, outbox)
                nursery.start_soon(self._wait_detached, detached, nursery.cancel_scope)
                nursery.start_soon(self._probe_clock, conn, session)
                conn.on_heartbeat = session.clock_answer
                while True:
                    message = await conn.receive_message()
                    if isinstance(message, ReportCounts):
                        session.set_counts(message)
                        continue
                    if isinstance(message, Goodbye):
                        session.closing = True
                        nursery.cancel_scope.cancel()
                        return message
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} from an agent",
                        code=ErrorCode.UNEXPECTED_MESSAGE,
                    )
        return None  # taken over: _wait_detached cancelled the nursery

    @staticmethod
    async def _probe_clock(conn: Connection, session: Session) -> None:
        """Send clock probes (heartbeats with our time); answers come to clock_answer."""
        for sent in itertools.count(1):
            now = time.time()
            session.probes.append(now)
            await conn.send(Heartbeat(time=now))
            await trio.sleep(CLOCK_PROBE_SPACING if sent < CLOCK_PROBES_FIRST else CLOCK_PROBE_INTERVAL)

    @staticmethod
    async def _wait_detached(detached: trio.Event, scope: trio.CancelScope) -> None:
        # Another connection took the session over: stop serving this one.
        await detached.wait()
        scope.cancel()

    def _end_session(self, session: Session, code: ErrorCode, reason: str) -> None:
        if session.ended:
            return
        session.ended = True
        if session.grace_scope is not None:
            session.grace_scope.cancel()
        self.sessions.pop(session.session_id, None)
        session.hub.end_all(code, reason)
        for feed in list(session.hub.feeds.values()):
            feed.end(code, reason, session.hub.last_seq)
        session.hub.feeds.clear()
        session.outbox_send.close()
        if session.data_scope is not None:
            session.data_scope.cancel()
        for key in self._closed_hub_totals:
            self._closed_hub_totals[key] += getattr(session.hub, key)
        for gap_reason, count in session.hub.gaps_by_reason.items():
            self._closed_gaps[gap_reason] = self._closed_gaps.get(gap_reason, 0) + count
        # An orderly end (GOODBYE) is "ended"; a connection lost for good is
        # "crashed".
        status = "ended" if code is ErrorCode.SESSION_ENDED else "crashed"
        session.info = attrs.evolve(session.public_info(), status=status, viewers=0, streaming=False)
        self._dirty.pop(session.session_id, None)
        self._broadcast(
            SessionEnded(
                session_id=session.session_id, reason=code.value, status=status, session=session.info
            )
        )
        log.info("session %s %s: %s", session.session_id, status, reason)

    @staticmethod
    async def _drain_outbox(conn: Connection, outbox: trio.MemoryReceiveChannel[Message]) -> None:
        async with outbox:
            async for message in outbox:
                await conn.send(message)

    async def _serve_agent_data(self, conn: Connection, hello: Hello) -> None:
        session = self.sessions.get(hello.session_id or "")
        if session is None or session.control is conn:
            await self._reject(conn, ErrorCode.UNKNOWN_SESSION, f"no live session {hello.session_id}")
            return
        if not hmac.compare_digest((hello.key or "").encode(), session.stream_key.encode()):
            await self._reject(conn, ErrorCode.BAD_TOKEN, "wrong or missing stream key")
            return
        if hello.stream != session.stream_no or not session.stream_wanted:
            await self._reject(conn, ErrorCode.STALE_STREAM, f"stream {hello.stream} is not wanted")
            return
        stream_no = session.stream_no
        conn.max_payload = MAX_DATA_PAYLOAD
        if session.data_scope is not None:
            # A newer stream replaces an older one still draining.
            session.data_scope.cancel()
        cancel_scope = trio.CancelScope()
        session.data_conn = conn
        session.data_scope = cancel_scope
        self._counts["agent_data_connections"] += 1
        self._changed(session)
        end: StreamEnd | None = None
        log.info("session %s: stream %d connected", session.session_id, stream_no)
        try:
            await self._accept(conn)
            with cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeats, conn)
                    end = await self._read_agent_data(conn, session)
                    nursery.cancel_scope.cancel()
        finally:
            self._counts["agent_data_connections"] -= 1
            session.data_ended(conn, stream_no, end)

    async def _read_agent_data(self, conn: Connection, session: Session) -> StreamEnd:
        hub = session.hub
        while True:
            frame = await conn.receive()
            if frame.kind is FrameKind.BATCH:
                try:
                    header = BatchHeader.unpack(frame.payload)
                except StreamDecodeError as exc:
                    raise RemoteProtocolError(str(exc), code=ErrorCode.BAD_STREAM) from exc
                hub.on_batch(header, encode_frame(FrameKind.BATCH, frame.payload))
                self.batch_sizes.observe(header.count)
                continue
            message = decode_message(frame)
            if isinstance(message, GapNotice):
                hub.on_gap(message)
            elif isinstance(message, StreamEnd):
                if message.code is ErrorCode.SESSION_ENDED:
                    hub.end_all(message.code, message.reason or "the session ended", message.last_seq)
                return message
            else:
                raise RemoteProtocolError(
                    f"unexpected {type(message).__name__} on a data connection",
                    code=ErrorCode.UNEXPECTED_MESSAGE,
                )

    # -- viewers -----------------------------------------------------------------------

    async def _serve_viewer_control(self, conn: Connection, hello: Hello) -> None:
        if self._counts["viewer_connections"] >= self.config.max_viewer_connections:
            await self._reject(conn, ErrorCode.LIMIT_REACHED, "too many viewer connections")
            return
        send, receive = trio.open_memory_channel[bytes](math.inf)
        everyone = self.all_sessions()
        listener = _ListListener(send, receive, limit=len(everyone) + self.config.max_list_backlog + 1)
        # Snapshot and subscription in one synchronous step: no event can fall
        # between them.
        for session in everyone:
            listener.put(encode_message(SessionAdded(session=session.public_info())))
        listener.put(encode_message(SnapshotEnd(count=len(everyone))))
        self._listeners.add(listener)
        self._counts["viewer_connections"] += 1
        try:
            await self._accept(conn)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, conn)
                nursery.start_soon(self._write_list, conn, listener)
                while True:
                    message = await conn.receive_message()
                    if isinstance(message, GetStats):
                        listener.put(
                            encode_message(Stats(stats=self._stats_for_wire(message.detail))), force=True
                        )
                        continue
                    if isinstance(message, PauseList):
                        listener.paused = True
                        continue
                    if isinstance(message, ResumeList):
                        # A fresh snapshot, then updates again (bounded by the
                        # number of sessions, like the first one).
                        listener.paused = False
                        listener.counts_stale = False
                        listener.put(encode_message(SnapshotBegin()), force=True)
                        everyone = self.all_sessions()
                        for session in everyone:
                            listener.put(
                                encode_message(SessionAdded(session=session.public_info())), force=True
                            )
                        listener.put(encode_message(SnapshotEnd(count=len(everyone))), force=True)
                        continue
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} from a viewer",
                        code=ErrorCode.UNEXPECTED_MESSAGE,
                    )
        finally:
            self._listeners.discard(listener)
            self._counts["viewer_connections"] -= 1

    async def _write_list(self, conn: Connection, listener: _ListListener) -> None:
        async with (
            listener.receive_channel,
            contextlib.aclosing(_coalesced(listener.receive_channel)) as writes,
        ):
            async for data, count in writes:
                listener.queued -= count
                await conn.send_raw(data)
                self._bytes_out += len(data)
        if listener.overflowed:
            self._slow_disconnects += 1
            raise RemoteProtocolError(
                "viewer did not read its session list updates", code=ErrorCode.SLOW_CONSUMER
            )

    async def _serve_viewer_data(self, conn: Connection, hello: Hello) -> None:
        session = self.find_session(hello.session_id or "")
        if session is None:
            await self._reject(conn, ErrorCode.UNKNOWN_SESSION, f"no live session {hello.session_id!r}")
            return
        if len(session.hub.subscribers) >= self.config.max_viewers_per_session:
            await self._reject(conn, ErrorCode.LIMIT_REACHED, "this session has its maximum of viewers")
            return
        await self._accept(conn, session.public_info())
        if session.ended:
            await conn.send(StreamEnd(code=ErrorCode.SESSION_ENDED, reason="the session ended"))
            return
        sub = session.add_subscriber(hello)
        self._counts["viewer_streams"] += 1
        log.info("session %s: viewer %d joined (%s)", session.session_id, sub.id, conn.name)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, conn)
                nursery.start_soon(self._watch_slow, session, sub)
                nursery.start_soon(self._ignore_viewer_input, conn)
                try:
                    await self._write_stream(conn, sub, session.hub)
                except ConnectionClosed as exc:
                    if exc.code is not ErrorCode.TIMEOUT:
                        raise
                    # Its writes stopped making progress: a stalled reader.
                    self._slow_consumer(session, sub)
                    raise RemoteProtocolError(exc.reason, code=ErrorCode.SLOW_CONSUMER) from exc
                nursery.cancel_scope.cancel()
        finally:
            sub.done.set()
            self._counts["viewer_streams"] -= 1
            session.remove_subscriber(sub)
            log.info("session %s: viewer %d left", session.session_id, sub.id)

    async def _ignore_viewer_input(self, conn: Connection) -> None:
        # A viewer sends nothing on a data connection but heartbeats; reading
        # keeps them counted and notices when it goes away.
        while True:
            message = await conn.receive_message()
            raise RemoteProtocolError(
                f"unexpected {type(message).__name__} on a viewer data connection",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )

    async def _watch_slow(self, session: Session, sub: Subscriber) -> None:
        """End the stream of a viewer that stays behind too long or loses too much."""
        timeout = self.config.slow_viewer_timeout
        while True:
            if sub.too_lossy.is_set():
                reason = (
                    f"slow consumer: lost {sub.records_dropped} of {sub.records_offered} records "
                    f"(more than {self.config.slow_viewer_max_loss:.0%})"
                )
                break
            if sub.state is SubscriberState.SKIPPING and trio.current_time() >= sub.skipping_since + timeout:
                reason = f"slow consumer: stayed behind for {timeout:g} s"
                break
            # Wake when it may have stayed behind too long (checked at least
            # every second) or when its loss share is exceeded.
            deadline = min(sub.skipping_since + timeout, trio.current_time() + min(timeout, 1.0))
            with trio.move_on_at(deadline):
                await sub.too_lossy.wait()
        log.warning("session %s: viewer %d disconnected: %s", session.session_id, sub.id, reason)
        self._slow_consumer(session, sub)
        # Its writer delivers what is queued, the gap and the CLOSE, then ends
        # (or hits the send deadline if the viewer reads nothing at all).
        session.hub.disconnect_slow(sub, reason)

    def _slow_consumer(self, session: Session, sub: Subscriber) -> None:
        if sub.slow_counted:
            return  # the watchdog and the writer may both notice the same viewer
        sub.slow_counted = True
        self._slow_disconnects += 1
        session.slow_disconnects += 1

    async def _write_stream(self, conn: Connection, sub: Subscriber, hub: Hub) -> None:
        receive = sub.receive_channel
        async with receive, contextlib.aclosing(_coalesced(receive)) as writes:
            async for data, _count in writes:
                await conn.send_raw(data)
                sub.written(len(data))
                hub.bytes_out += len(data)
                self._bytes_out += len(data)
                if (
                    sub.state is SubscriberState.SKIPPING
                    and not sub.sync_asked
                    and sub.queued_bytes <= sub.budget // 2
                ):
                    # Drained: the sync point asked for when it fell behind
                    # may have passed meanwhile; ask for the next one now.
                    sub.sync_asked = True
                    hub.request_sync()


async def _coalesced(receive: trio.MemoryReceiveChannel[bytes]) -> AsyncGenerator[tuple[bytes, int], None]:
    """Queued frames joined into writes of up to WRITE_COALESCE bytes: ``(data, frames)``.

    Waits for the first frame, then takes whatever else is already queued.
    """
    while True:
        try:
            first = await receive.receive()
        except trio.EndOfChannel:
            return
        frames = [first]
        size = len(first)
        while size < WRITE_COALESCE:
            try:
                frame = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            frames.append(frame)
            size += len(frame)
        yield (b"".join(frames) if len(frames) > 1 else first), len(frames)


@contextlib.asynccontextmanager
async def _peer_errors(conn: Connection) -> AsyncIterator[None]:
    """A peer's expected failures end here: logged, the peer told why, swallowed.

    Anything else is a relay bug: logged with its traceback, and only this
    connection goes.
    """
    try:
        yield
    except RemoteProtocolError as exc:
        log.warning("%s: protocol error: %s", conn.name, exc)
        await conn.aclose(exc.code, str(exc))
    except ConnectionClosed as exc:
        log.info("%s", exc.reason)
    except Exception:
        log.exception("%s: internal error", conn.name)
        await conn.aclose(ErrorCode.INTERNAL, "internal error in the relay")


def make_server_ssl_context(cert: str, key: str | None, *, client_ca: str | None = None) -> ssl.SSLContext:
    """A server context with the ssl module's secure defaults, TLS 1.2 minimum.

    With ``client_ca``, clients must present a certificate signed by it (mutual TLS).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        token = file.read().strip()
    if not token:
        raise OSError(errno.EINVAL, "the token file is empty", path)
    return token


async def serve_relay(
    config: RelayConfig | None = None,
    *,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay until cancelled.

    Calls ``task_status.started(relay)`` once both ports listen; ``relay`` has
    ``agent_port``, ``viewer_port`` and ``statistics()``.

    Raises:
      OSError: a port cannot be bound.
    """
    config = config or RelayConfig()
    relay = Relay(config)
    agent_listeners = await trio.open_tcp_listeners(config.agent_port, host=config.host)
    try:
        viewer_listeners = await trio.open_tcp_listeners(config.viewer_port, host=config.host)
    except BaseException:
        for listener in agent_listeners:
            await listener.aclose()
        raise
    relay.agent_port = agent_listeners[0].socket.getsockname()[1]
    relay.viewer_port = viewer_listeners[0].socket.getsockname()[1]
    log.info(
        "relay listening on %s: agents on port %d, viewers on port %d%s",
        config.host,
        relay.agent_port,
        relay.viewer_port,
        " (TLS)" if config.tls else "",
    )
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            relay._nursery = nursery
            # Connections run in the relay's nursery; the listeners in a scope
            # of their own, so shutdown() can stop accepting first.
            listening = trio.CancelScope()
            relay._listening = listening

            async def listen() -> None:
                with listening:
                    async with trio.open_nursery() as listeners:
                        for handler, group in (
                            (relay.handle_agent_connection, agent_listeners),
                            (relay.handle_viewer_connection, viewer_listeners),
                        ):
                            listeners.start_soon(
                                functools.partial(
                                    trio.serve_listeners, handler, group, handler_nursery=nursery
                                )
                            )

            nursery.start_soon(listen)
            nursery.start_soon(relay._serve_list_updates)
            if config.cluster:
                from .cluster import serve_cluster

                await nursery.start(serve_cluster, relay)
            task_status.started(relay)

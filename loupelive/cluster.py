"""Relays that behave as one: a cluster over NATS.

Theory of operation
-------------------
Each relay started with ``--cluster nats://…`` keeps one NATS connection
(``nats-py``, an asyncio client, run inside the relay's Trio loop by
``trio-asyncio``; see :class:`NatsBridge`) and speaks on a handful of subjects
under a prefix (``loupelive`` by default; ARCHITECTURE.md §7 has the messages):

``P.alive``
    every relay, once a second: "I am here" (name, start epoch).
``P.dir``
    the **directory**: each relay publishes its own sessions' registrations,
    changes, counters and ends; every relay keeps the others' sessions as
    :class:`RemoteSession` entries, so each viewer's list is cluster-wide (a
    session's ``relay`` field says which relay holds it).
``P.sync``
    a relay that starts, or reconnects to NATS, asks everyone for a full
    snapshot of their sessions (answered on ``P.dir``).
``P.ctl.NAME``
    commands to relay NAME about one of its sessions, from a relay whose
    viewers watch it: add / remove a viewer, request a sync point, unwatch.
``P.feed.NAME``
    the frames of every session relay NAME watches elsewhere, published by the
    owning relays: **one copy per watching relay**, whatever the number of its
    viewers, opaque (the owner forwards the agent's frames as they are).

Watching a remote session is the single-relay protocol with NATS in the middle.
The watching relay runs a :class:`RemoteSession` with its own :class:`Hub`:
its viewers are ordinary subscribers (history, sync points, skipping, gaps).
What it would tell an agent (ADD_VIEWER, REMOVE_VIEWER, REQUEST_SYNC) it sends
to the owner, which maps the viewer ids into its own and commands the agent.
The owner forwards the session's frames to each watching relay through a
:class:`Feed`: live batches, and history batches addressed to that relay's
viewers (their viewer id rewritten back).

Nothing blocks the owner: a feed has a byte budget; over it, it skips live
batches until a sync point and then sends a GAP ``cluster_overflow`` naming
exactly what it dropped.  Each feed message carries a sequence number; a
watching relay that sees a hole (NATS dropped messages: a slow consumer, a
reconnect) re-adds each of its viewers with ``after_seq``, so they resume from
the agent's buffer with nothing lost or repeated, as after any stream break.

A relay not heard from for ``cluster_timeout`` is gone: its sessions turn
``disconnected`` and end (``crashed``) after ``agent_grace`` unless their agents
register with another relay (they accept several relay addresses): the new
owner announces the session, and watching relays re-add their viewers there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import secrets
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, cast

import attrs
import trio

from .errors import ErrorCode, StreamDecodeError
from .hub import Hub, Subscriber
from .messages import (
    AddViewer,
    CountsEntry,
    GapNotice,
    Hello,
    SessionAdded,
    SessionChanged,
    SessionEnded,
    SessionInfo,
    decode_message,
    encode_message,
)
from .records import BatchHeader
from .wire import MAX_DATA_PAYLOAD, Frame, FrameDecoder, FrameKind, encode_frame

if TYPE_CHECKING:
    from .relay import Relay, Session

__all__ = ["Cluster", "Feed", "NatsBridge", "RemoteSession", "default_relay_name", "serve_cluster"]

log = logging.getLogger("loupelive.cluster")

#: "I am here", this often (seconds).
ALIVE_INTERVAL: Final = 1.0
#: Sessions per directory snapshot message (NATS messages stay well under 1 MiB).
SNAPSHOT_CHUNK: Final = 200
#: Bytes of frames per feed message.
FEED_MESSAGE_BYTES: Final = 256 * 1024
#: Incoming NATS messages waiting for the relay's Trio side; more is a NATS
#: slow consumer on our side: the message is dropped and counted (feeds notice
#: the hole and resume).
INBOX_SIZE: Final = 10_000
#: At most one sync request per remote session per this many seconds.
SYNC_REQUEST_INTERVAL: Final = 0.05
#: Bytes handed to the NATS client and not yet written, for all feeds: beyond
#: it, feeds skip (cluster_overflow) rather than grow memory.
MAX_PENDING_PUBLISH: Final = 64 * 1024 * 1024
#: How long stopping the NATS client's tasks may take (seconds).
CLOSE_TIMEOUT: Final = 2.0
#: Bytes nats-py may hold unwritten before our publisher waits for its socket.
MAX_UNWRITTEN: Final = 4 * 1024 * 1024

GAP_CLUSTER_OVERFLOW: Final = "cluster_overflow"

# Feed message types (first byte).
FEED_FRAMES: Final = 1
FEED_RESTART: Final = 2
FEED_END: Final = 3
_FEED_HEAD: Final = struct.Struct(">BQB")  # type, feed seq, length of the session id


def default_relay_name(agent_port: int) -> str:
    """The host name (made subject-safe) and the agent port."""
    host = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in socket.gethostname())
    return f"{host[:48] or 'relay'}-{agent_port}"


# -- NATS inside Trio --------------------------------------------------------------------


class NatsBridge:
    """A ``nats-py`` connection run by trio-asyncio inside the relay's Trio loop.

    Why trio-asyncio: nats-py is the NATS project's own, well-kept Python client
    and it is asyncio-only; trio-asyncio runs an asyncio loop *on* Trio in the
    same thread, so the relay stays one Trio program (its cancel scopes and
    nurseries rule) and calls between the two sides are plain function calls,
    not thread hand-offs.  Outgoing messages go through one asyncio task (a
    queue), so a publish from Trio is a non-blocking append; incoming messages
    are handed to Trio through bounded memory channels.
    """

    def __init__(
        self,
        servers: list[str],
        *,
        name: str,
        creds: str | None = None,
        tls_ca: str | None = None,
        on_connect: Callable[[bool], None] | None = None,
    ) -> None:
        self.servers = servers
        self.name = name
        self.creds = creds
        self.tls_ca = tls_ca
        self.on_connect = on_connect
        self.connected = False
        self.pending_bytes = 0
        self.published = 0
        self.received = 0
        self.inbox_drops = 0
        self.reconnects = 0
        self._queue: Any = None
        self._loop: Any = None
        self._nc: Any = None
        self._subs: list[tuple[str, Callable[[bytes], None]]] = []
        #: Set once the first connection to NATS is up.
        self.first_connect = trio.Event()
        self._last_error = ""
        self._last_error_at = -math.inf

    def publish(self, subject: str, data: bytes, on_sent: Callable[[int], None] | None = None) -> None:
        """Queue ``data`` for ``subject`` (never blocks; ``on_sent(len)`` once written)."""
        if self._queue is None:
            if on_sent is not None:
                on_sent(len(data))
            return
        self.pending_bytes += len(data)
        self._loop.call_soon(self._queue.put_nowait, (subject, data, on_sent))

    def subscribe(self, subject: str, handler: Callable[[bytes], None]) -> None:
        """Call ``handler(data)`` (synchronously, on the Trio thread) per message."""
        self._subs.append((subject, handler))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying for ever), serve, and close on cancellation."""
        import trio_asyncio

        async with trio_asyncio.open_loop() as loop:
            self._loop = loop
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio_asyncio.aio_as_trio(self._aio_main))
                # The relay serves at once; NATS connects when it can.
                await trio.lowlevel.checkpoint()
                task_status.started()

    async def _aio_main(self) -> None:
        import asyncio

        import nats

        self._queue = asyncio.Queue()
        options: dict[str, Any] = {
            "servers": self.servers,
            "name": f"loupelive relay {self.name}",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "connect_timeout": 2,
            "ping_interval": 5,
            "max_outstanding_pings": 3,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
            "closed_cb": self._closed,
        }
        if self.creds:
            options["user_credentials"] = self.creds
        if self.tls_ca or any(s.startswith("tls://") for s in self.servers):
            options["tls"] = ssl.create_default_context(cafile=self.tls_ca)
        while True:
            try:
                self._nc = await nats.connect(**options)
                break
            except Exception as exc:
                log.warning("cluster: cannot reach NATS at %s (%s); retrying", ",".join(self.servers), exc)
                await asyncio.sleep(1.0)
        for subject, handler in self._subs:
            await self._nc.subscribe(subject, cb=self._callback(handler), pending_msgs_limit=INBOX_SIZE)
        self.connected = True
        self.first_connect.set()
        log.info("cluster: connected to NATS %s as relay %s", self._nc.connected_url.netloc, self.name)
        if self.on_connect is not None:
            self.on_connect(False)
        try:
            while True:
                subject, data, on_sent = await self._queue.get()
                try:
                    await self._nc.publish(subject, data)
                    if self._unwritten() > MAX_UNWRITTEN:
                        # NATS (or the network) is not taking it: wait for the
                        # socket to drain. Meanwhile our queue grows, and feeds
                        # see it and skip (cluster_overflow) instead.
                        await self._nc._transport.drain()
                except Exception as exc:
                    log.warning("cluster: publish on %s failed: %s", subject, exc)
                self.pending_bytes -= len(data)
                self.published += 1
                if on_sent is not None:
                    on_sent(len(data))
        finally:
            await self._close_nats()

    async def _close_nats(self) -> None:
        """Drop the NATS connection, in bounded time, leaving no asyncio task behind.

        nats-py's ``close()`` can wait on a dead server (it swallows the
        cancellation of its own waits), and a stopping relay must not wait for
        NATS: the socket is closed and every other asyncio task (nats-py's
        reader, flusher, pinger, reconnector) cancelled and awaited, as
        ``asyncio.run`` does, while the loop still runs: trio-asyncio cannot
        finish a task once its loop has stopped.
        """
        import asyncio

        nc = self._nc
        if nc is not None:
            with contextlib.suppress(Exception):
                nc._status = nc.CLOSED  # no more reconnecting
            transport = getattr(nc, "_transport", None)
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        if others:
            with contextlib.suppress(BaseException):
                await asyncio.wait(others, timeout=CLOSE_TIMEOUT)

    def _unwritten(self) -> int:
        """Bytes nats-py holds that have not reached the socket yet.

        nats-py puts no limit on its socket's write buffer, so this is how a
        stalled NATS server becomes backpressure here.
        """
        try:
            writer = self._nc._transport._io_writer
            return int(writer.transport.get_write_buffer_size()) + int(self._nc._pending_data_size)
        except AttributeError:  # another transport (websocket) or a newer nats-py
            return 0

    def _callback(self, handler: Callable[[bytes], None]) -> Any:
        async def callback(msg: Any) -> None:
            self.received += 1
            try:
                handler(msg.data)
            except Exception:
                log.exception("cluster: handling a message on %s failed", msg.subject)

        return callback

    async def _disconnected(self) -> None:
        if self.connected:
            log.warning("cluster: lost the NATS connection; reconnecting")
        self.connected = False

    async def _reconnected(self) -> None:
        self.connected = True
        self.reconnects += 1
        log.info("cluster: reconnected to NATS %s", self._nc.connected_url.netloc)
        if self.on_connect is not None:
            self.on_connect(True)

    async def _error(self, exc: Exception) -> None:
        # While NATS is down every reconnect attempt fails: say so once a
        # minute, not twice a second.
        now = time.monotonic()
        text = str(exc)
        if text != self._last_error or now - self._last_error_at >= 60.0:
            log.warning("cluster: NATS error: %s", text)
            self._last_error, self._last_error_at = text, now

    async def _closed(self) -> None:
        self.connected = False


# -- the owner's side: feeds ------------------------------------------------------------------


@attrs.define(eq=False)
class Feed:
    """One session's frames for one watching relay, on the session's owner."""

    cluster: Cluster
    session: Session
    watcher: str
    budget: int
    #: The owner's viewer ids (as the agent knows them) → the watcher's.
    ids: dict[int, int] = attrs.Factory(dict)
    by_watcher: dict[int, int] = attrs.Factory(dict)
    queue: deque[bytes] = attrs.Factory(deque)
    queued_bytes: int = 0
    seq: int = 0
    last_seq: int = 0
    skipping: bool = False
    skip_from: int = 0
    #: A sync point was asked for since the queue drained (see sent()).
    sync_asked: bool = False
    records_dropped: int = 0
    gaps: int = 0
    bytes_sent: int = 0
    closed: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)

    @property
    def subject(self) -> str:
        return self.cluster.subject("feed", self.watcher)

    def _put(self, data: bytes) -> None:
        self.queue.append(data)
        self.queued_bytes += len(data)
        self.wake.set()

    def _over_budget(self) -> bool:
        return self.queued_bytes > self.budget or self.cluster.bridge.pending_bytes > MAX_PENDING_PUBLISH

    def on_batch(self, header: BatchHeader, frame: bytes) -> None:
        if self.closed:
            return
        if header.history:
            watcher_id = self.ids.get(header.viewer)
            if watcher_id is not None:
                # History is what a viewer asked for: never skipped (it is
                # bounded by the request), its viewer id put back.
                payload = frame[5:]
                _, offset = BatchHeader.parse(payload)
                renamed = attrs.evolve(header, viewer=watcher_id)
                self._put(encode_frame(FrameKind.BATCH, renamed.pack() + payload[offset:]))
            return
        empty_sync = header.sync and header.count == 0 and header.first_seq == self.last_seq + 1
        if not self.ids or (header.last_seq <= self.last_seq and not empty_sync):
            return
        if self.skipping:
            if header.sync and self.queued_bytes <= self.budget // 2:
                self._gap(self.skip_from, header.first_seq - 1)
                self.skipping = False
            else:
                self.records_dropped += header.count
                return
        elif self._over_budget():
            self.skipping = True
            self.sync_asked = False
            self.skip_from = max(header.first_seq, self.last_seq + 1)
            self.records_dropped += header.count
            self.cluster.overflows += 1
            log.warning(
                "cluster: feed of session %s to relay %s is behind; skipping to the next sync point",
                self.session.session_id,
                self.watcher,
            )
            self.session.request_sync()
            return
        self._put(frame)
        self.last_seq = header.last_seq

    def _gap(self, first: int, last: int) -> None:
        if last < first:
            return
        self.gaps += 1
        self.cluster.gaps_sent += 1
        self._put(encode_message(GapNotice(first_seq=first, last_seq=last, reason=GAP_CLUSTER_OVERFLOW)))
        self.last_seq = max(self.last_seq, last)

    def on_gap(self, gap: GapNotice) -> None:
        if self.closed:
            return
        if gap.viewer:
            watcher_id = self.ids.get(gap.viewer)
            if watcher_id is not None:
                self._put(encode_message(attrs.evolve(gap, viewer=watcher_id)))
            return
        if self.ids and not self.skipping and gap.last_seq > self.last_seq:
            self._put(
                encode_message(GapNotice(first_seq=gap.first_seq, last_seq=gap.last_seq, reason=gap.reason))
            )
            self.last_seq = gap.last_seq

    def restart(self) -> None:
        """The session's stream broke or its agent came back: the watcher re-adds its viewers."""
        self.skipping = False
        self.last_seq = 0
        self._send(FEED_RESTART, b"")

    def end(self, code: ErrorCode, reason: str, last_seq: int) -> None:
        self._send(
            FEED_END, json.dumps({"code": code.value, "reason": reason, "last_seq": last_seq}).encode()
        )
        self.closed = True
        self.wake.set()

    def _send(self, kind: int, payload: bytes) -> None:
        self.flush()
        self.seq += 1
        self.cluster.publish_feed(self, kind, self.seq, payload)

    def flush(self) -> None:
        """Hand what is queued to NATS, in messages of up to FEED_MESSAGE_BYTES."""
        while self.queue:
            parts = [self.queue.popleft()]
            size = len(parts[0])
            while self.queue and size + len(self.queue[0]) <= FEED_MESSAGE_BYTES:
                parts.append(self.queue.popleft())
                size += len(parts[-1])
            self.seq += 1
            # Counted as queued until NATS has written it.
            self.cluster.publish_feed(self, FEED_FRAMES, self.seq, b"".join(parts), count=False)

    def sent(self, nbytes: int) -> None:
        self.queued_bytes -= nbytes
        self.bytes_sent += nbytes
        if self.skipping and not self.sync_asked and self.queued_bytes <= self.budget // 2:
            # Drained: the sync point asked for when it fell behind may have
            # passed meanwhile; ask for the next one now.
            self.sync_asked = True
            self.session.request_sync()

    async def run(self) -> None:
        """Move queued frames to NATS as they come (one task per feed)."""
        while not self.closed:
            await self.wake.wait()
            self.wake = trio.Event()
            self.flush()
            # Let frames that arrive together go out together.
            await trio.lowlevel.checkpoint()


# -- the watcher's side: remote sessions ----------------------------------------------------


@attrs.define(eq=False)
class RemoteSession:
    """A session held by another relay, as this relay shows and serves it."""

    cluster: Cluster
    info: SessionInfo
    owner: str
    hub: Hub = attrs.field(init=False)
    ended: bool = False
    slow_disconnects: int = 0
    expected_seq: int = 0
    #: The owner's start epoch when it announced this session.
    owner_epoch: str = ""
    last_sync_request: float = -math.inf
    #: Set while waiting for the owner to come back (or another to take over).
    lost_scope: trio.CancelScope | None = None

    def __attrs_post_init__(self) -> None:
        self.hub = Hub(request_sync=self.request_sync, name=f"remote session {self.info.session_id}")

    @property
    def session_id(self) -> str:
        return self.info.session_id

    def public_info(self) -> SessionInfo:
        return self.info

    def counts_entry(self) -> CountsEntry:
        return CountsEntry.of(self.info)

    def command(self, message: AddViewer | dict[str, Any]) -> None:
        obj = message if isinstance(message, dict) else {"kind": "add", **message.to_json()}
        self.cluster.send_ctl(self.owner, {**obj, "session_id": self.session_id})

    def add_subscriber(self, hello: Hello) -> Subscriber:
        sub = self.cluster.relay.new_subscriber(self.hub, hello)
        self.command(sub.request)
        return sub

    def remove_subscriber(self, sub: Subscriber) -> None:
        if self.hub.subscribers.pop(sub.id, None) is None:
            return
        sub.send_channel.close()
        if not self.ended:
            self.command({"kind": "remove", "viewer": sub.id})

    def request_sync(self) -> None:
        now = trio.current_time()
        if now - self.last_sync_request >= SYNC_REQUEST_INTERVAL:
            self.last_sync_request = now
            self.command({"kind": "sync"})

    def restart_all(self) -> None:
        """Ask the owner again for every viewer, from where each one is."""
        self.expected_seq = 0
        for sub in self.hub.subscribers.values():
            self.command(self.hub.restart(sub))

    def on_feed(self, kind: int, seq: int, payload: bytes) -> None:
        if self.expected_seq and seq != self.expected_seq:
            # NATS lost messages (a slow consumer, a reconnect): the viewers'
            # decoders cannot go on; resume each from its last seq.
            self.cluster.feed_holes += 1
            log.warning(
                "cluster: feed of session %s from %s lost messages (%d, expected %d); resuming its viewers",
                self.session_id,
                self.owner,
                seq,
                self.expected_seq,
            )
            self.restart_all()
            self.expected_seq = seq + 1
            return
        self.expected_seq = seq + 1
        if kind == FEED_RESTART:
            self.restart_all()
            self.expected_seq = seq + 1
        elif kind == FEED_END:
            end = json.loads(payload)
            code = _code(end.get("code"))
            self.hub.end_all(code, str(end.get("reason", "")), int(end.get("last_seq", 0)))
        elif kind == FEED_FRAMES:
            decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD, expect_preamble=False)
            decoder.receive_data(payload)
            while (event := decoder.next_event()) is not None:
                assert isinstance(event, Frame)
                self._route(event)

    def _route(self, frame: Frame) -> None:
        if frame.kind is FrameKind.BATCH:
            try:
                header = BatchHeader.unpack(frame.payload)
            except StreamDecodeError:
                log.warning("cluster: bad batch in the feed of session %s", self.session_id)
                return
            self.hub.on_batch(header, encode_frame(FrameKind.BATCH, frame.payload))
            return
        message = decode_message(frame)
        if isinstance(message, GapNotice):
            self.hub.on_gap(message)


def _code(text: object) -> ErrorCode:
    try:
        return ErrorCode(str(text))
    except ValueError:
        return ErrorCode.INTERNAL


# -- the cluster ------------------------------------------------------------------------------


class Cluster:
    """One relay's membership in a cluster: directory, feeds, remote sessions."""

    def __init__(self, relay: Relay, servers: list[str], name: str) -> None:
        config = relay.config
        self.relay = relay
        self.name = name
        self.prefix = config.cluster_prefix
        self.epoch = secrets.token_hex(6)
        self.bridge = NatsBridge(
            servers,
            name=name,
            creds=config.cluster_creds,
            tls_ca=config.cluster_tls_ca,
            on_connect=self._on_connect,
        )
        #: Sessions held by other relays.
        self.remote: dict[str, RemoteSession] = {}
        #: Other relays: name → (epoch, trio time last heard).
        self.peers: dict[str, tuple[str, float]] = {}
        # Directory snapshots being received: owner → session ids so far.
        self._snapshots: dict[str, set[str]] = {}
        self._changed = trio.Event()
        self.nursery: trio.Nursery | None = None
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[tuple[str, bytes]](INBOX_SIZE)
        self._remote_full_logged = False
        #: When our own "alive" last came back through NATS.
        self._self_heard = -math.inf
        #: Since when our own "alive" has come back without a stall.
        self._link_ok_since = -math.inf
        self.overflows = 0
        self.gaps_sent = 0
        self.feed_holes = 0
        self.feed_bytes_out = 0
        self.feed_bytes_in = 0
        self.feed_messages_in = 0

    def subject(self, *parts: str) -> str:
        return ".".join((self.prefix, *parts))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checked whenever peers or remote sessions change."""
        while not predicate():
            await self._changed.wait()

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for kind in ("alive", "dir", "sync"):
            self.bridge.subscribe(self.subject(kind), functools.partial(self._enqueue, kind))
        self.bridge.subscribe(self.subject("ctl", self.name), functools.partial(self._enqueue, "ctl"))
        self.bridge.subscribe(self.subject("feed", self.name), functools.partial(self._enqueue, "feed"))
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._dispatch)
            await nursery.start(self.bridge.run)
            nursery.start_soon(self._alive)
            task_status.started()

    def _enqueue(self, kind: str, data: bytes) -> None:
        try:
            self._inbox_send.send_nowait((kind, data))
        except trio.WouldBlock:
            self.bridge.inbox_drops += 1

    def _on_connect(self, again: bool) -> None:
        # A fresh or renewed NATS connection: announce ourselves and ask
        # everyone for their sessions (what changed meanwhile was missed).
        self._publish_json("sync", {"relay": self.name})
        self.publish_snapshot()

    async def _dispatch(self) -> None:
        handlers: dict[str, Callable[[bytes], None]] = {
            "alive": self._on_alive,
            "dir": self._on_dir,
            "sync": self._on_sync,
            "ctl": self._on_ctl,
            "feed": self._on_feed,
        }
        async for kind, data in self._inbox_receive:
            try:
                handlers[kind](data)
            except Exception:
                log.exception("cluster: a %s message could not be handled", kind)

    async def _alive(self) -> None:
        while True:
            if self.bridge.connected:
                self._publish_json(
                    "alive", {"relay": self.name, "epoch": self.epoch, "sessions": len(self.relay.sessions)}
                )
            self._check_peers()
            await trio.sleep(ALIVE_INTERVAL)

    def _check_peers(self) -> None:
        deadline = trio.current_time() - self.relay.config.cluster_timeout
        if not self.bridge.connected or self._self_heard < deadline or self._link_ok_since > deadline:
            # Our own "alive" has not come back either: it is our NATS link
            # (or NATS) that is silent, not the other relays. Judge nobody.
            return
        for name, (_epoch, seen) in list(self.peers.items()):
            if seen < deadline:
                del self.peers[name]
                self._notify()
                log.warning("cluster: relay %s is gone; its sessions wait for their agents", name)
                for remote in list(self.remote.values()):
                    if remote.owner == name:
                        self._owner_lost(remote)

    # -- publishing ------------------------------------------------------------------

    def _publish_json(self, kind: str, obj: dict[str, Any], *extra: str) -> None:
        if self.bridge._queue is None:
            return
        self.bridge.publish(self.subject(kind, *extra), json.dumps(obj, separators=(",", ":")).encode())

    def publish_session(self, message: SessionAdded | SessionChanged | SessionEnded) -> None:
        """A local session's registration, change or end, for the directory."""
        if isinstance(message, SessionEnded):
            obj: dict[str, Any] = {"kind": "ended", **message.to_json()}
        else:
            obj = {"kind": "session", "session": message.session.to_json()}
        self._publish_json("dir", {"relay": self.name, "epoch": self.epoch, **obj})

    def publish_counts(self, entries: Iterable[CountsEntry]) -> None:
        entries = list(entries)
        for i in range(0, len(entries), SNAPSHOT_CHUNK * 2):
            chunk = [e.to_json() for e in entries[i : i + SNAPSHOT_CHUNK * 2]]
            self._publish_json("dir", {"relay": self.name, "kind": "counts", "counts": chunk})

    def publish_snapshot(self) -> None:
        sessions = [s.public_info().to_json() for s in self.relay.sessions.values() if not s.ended]
        parts = max(1, math.ceil(len(sessions) / SNAPSHOT_CHUNK))
        for part in range(parts):
            chunk = sessions[part * SNAPSHOT_CHUNK : (part + 1) * SNAPSHOT_CHUNK]
            self._publish_json(
                "dir",
                {
                    "relay": self.name,
                    "kind": "snapshot",
                    "epoch": self.epoch,
                    "part": part,
                    "parts": parts,
                    "sessions": chunk,
                },
            )

    def send_ctl(self, owner: str, obj: dict[str, Any]) -> None:
        self._publish_json("ctl", {"watcher": self.name, **obj}, owner)

    def publish_feed(self, feed: Feed, kind: int, seq: int, payload: bytes, *, count: bool = True) -> None:
        sid = feed.session.session_id.encode()
        data = _FEED_HEAD.pack(kind, seq, len(sid)) + sid + payload
        if count:
            feed.queued_bytes += len(payload)
        self.feed_bytes_out += len(data)
        overhead = len(data) - len(payload)

        def sent(nbytes: int) -> None:
            feed.sent(nbytes - overhead)

        if self.bridge._queue is None:
            feed.sent(len(payload))
            return
        self.bridge.publish(feed.subject, data, sent)

    # -- receiving -------------------------------------------------------------------

    def _on_alive(self, data: bytes) -> None:
        obj = json.loads(data)
        name = str(obj.get("relay", ""))
        if name == self.name:
            now = trio.current_time()
            if now - self._self_heard > 2 * ALIVE_INTERVAL:
                # Our link was silent (NATS stalled or away): others' news
                # may still be queued behind their data, so give them a full
                # cluster_timeout from now before judging anyone.
                self._link_ok_since = now
            self._self_heard = now
            return
        if not name:
            return
        epoch = str(obj.get("epoch", ""))
        known = self.peers.get(name)
        self.peers[name] = (epoch, trio.current_time())
        if known is None:
            log.info("cluster: relay %s is here", name)
            self._notify()
            # A relay (re)appearing: its sessions are what it announces now.

    def _heard_from(self, name: str) -> None:
        """Any message from a relay shows it is alive: after a NATS stall its
        "alive" may come late, queued behind megabytes of its feeds."""
        if name in self.peers:
            self.peers[name] = (self.peers[name][0], trio.current_time())

    def _on_sync(self, data: bytes) -> None:
        obj = json.loads(data)
        if obj.get("relay") != self.name:
            self.publish_snapshot()

    def _on_dir(self, data: bytes) -> None:
        obj = json.loads(data)
        owner = str(obj.get("relay", ""))
        if owner == self.name or not owner:
            return
        self._heard_from(owner)
        kind = obj.get("kind")
        epoch = str(obj.get("epoch", ""))
        if kind == "session":
            self._upsert(owner, SessionInfo.from_json(obj.get("session")), epoch)
        elif kind == "snapshot":
            part, parts = int(obj.get("part", 0)), int(obj.get("parts", 1))
            if part == 0:
                self._snapshots[owner] = set()
            seen = self._snapshots.setdefault(owner, set())
            for session in obj.get("sessions", []):
                info = SessionInfo.from_json(session)
                seen.add(info.session_id)
                self._upsert(owner, info, epoch)
            if part == parts - 1:
                # What the owner no longer has: its agent is away.
                for gone in list(self.remote.values()):
                    if gone.owner == owner and gone.session_id not in seen:
                        self._owner_lost(gone)
                self._snapshots.pop(owner, None)
        elif kind == "counts":
            for raw in obj.get("counts", []):
                entry = CountsEntry.from_json(raw)
                counted = self.remote.get(entry.session_id)
                if counted is not None and counted.owner == owner:
                    counted.info = attrs.evolve(
                        counted.info.with_counts(entry.counts), clock_offset=entry.clock_offset, rtt=entry.rtt
                    )
                    self.relay._counts_changed(counted)  # type: ignore[arg-type]
        elif kind == "ended":
            message = SessionEnded.from_json(obj)
            remote = self.remote.get(message.session_id)
            if remote is not None and remote.owner == owner:
                self._end_remote(remote, message)

    def _upsert(self, owner: str, info: SessionInfo, epoch: str = "") -> None:
        session_id = info.session_id
        info = attrs.evolve(info, relay=owner)
        if session_id in self.relay.sessions:
            return  # its agent is connected here: ours is the truth
        remote = self.remote.get(session_id)
        if remote is None:
            if len(self.remote) >= self.relay.config.max_sessions:
                if not self._remote_full_logged:
                    self._remote_full_logged = True
                    log.warning(
                        "cluster: %d sessions of other relays held (max_sessions); more are not listed here",
                        len(self.remote),
                    )
                return
            remote = RemoteSession(cluster=self, info=info, owner=owner, owner_epoch=epoch)
            self.remote[session_id] = remote
            self.relay._broadcast(SessionAdded(session=info), local=False)
            self._notify()
            return
        moved = remote.owner != owner
        if moved and not (
            info.status == "running"
            and (remote.info.status != "running" or info.connected_at >= remote.info.connected_at)
        ):
            # A stale claim (the old relay still shows it disconnected, or an
            # older registration): the agent's current relay wins.
            return
        came_back = remote.info.status != "running" and info.status == "running"
        restarted = bool(epoch) and epoch != remote.owner_epoch
        remote.info = info
        remote.owner_epoch = epoch or remote.owner_epoch
        if remote.lost_scope is not None:
            remote.lost_scope.cancel()
            remote.lost_scope = None
        if moved:
            log.info("cluster: session %s moved from %s to %s", session_id, remote.owner, owner)
            self.send_ctl(remote.owner, {"kind": "unwatch", "session_id": session_id})
            remote.owner = owner
            remote.restart_all()
        elif came_back or restarted:
            # Its agent is back (perhaps at a restarted relay that has no feed
            # for us): ask again for every viewer, from where each one is.
            remote.restart_all()
        self.relay._broadcast(SessionChanged(session=info), local=False)
        self._notify()

    def _end_remote(self, remote: RemoteSession, message: SessionEnded) -> None:
        remote.ended = True
        self.remote.pop(remote.session_id, None)
        code = ErrorCode.SESSION_ENDED if message.status == "ended" else ErrorCode.AGENT_LOST
        remote.hub.end_all(code, "the session ended" if message.status == "ended" else "the agent was lost")
        self.relay._broadcast(message, local=False)
        self._notify()

    def _owner_lost(self, remote: RemoteSession) -> None:
        remote.info = attrs.evolve(remote.info, status="disconnected", streaming=False)
        self.relay._broadcast(SessionChanged(session=remote.info), local=False)
        if self.nursery is not None and remote.lost_scope is None:
            self.nursery.start_soon(self._end_after_grace, remote)

    async def _end_after_grace(self, remote: RemoteSession) -> None:
        with trio.CancelScope() as scope:
            remote.lost_scope = scope
            await trio.sleep(self.relay.config.agent_grace)
            if self.remote.get(remote.session_id) is remote and remote.owner not in self.peers:
                info = attrs.evolve(remote.info, status="crashed")
                self._end_remote(
                    remote,
                    SessionEnded(
                        session_id=remote.session_id, reason="agent_lost", status="crashed", session=info
                    ),
                )
        if remote.lost_scope is scope:
            remote.lost_scope = None

    def adopt(self, session: Session) -> None:
        """A session that was remote registered here (its agent moved): take its viewers."""
        remote = self.remote.pop(session.session_id, None)
        if remote is None:
            return
        if remote.lost_scope is not None:
            remote.lost_scope.cancel()
        self.send_ctl(remote.owner, {"kind": "unwatch", "session_id": session.session_id})
        if remote.hub.subscribers:
            session.hub.subscribers.update(remote.hub.subscribers)
            session.ensure_stream()
            for sub in session.hub.subscribers.values():
                sub_request = session.hub.restart(sub)
                session.command(sub_request)

    def _on_ctl(self, data: bytes) -> None:
        obj = json.loads(data)
        watcher = str(obj.get("watcher", ""))
        session = self.relay.sessions.get(str(obj.get("session_id", "")))
        if session is None or session.ended or not watcher:
            return
        kind = obj.get("kind")
        feed = cast("Feed | None", session.hub.feeds.get(watcher))
        if kind == "add":
            request = AddViewer.from_json(obj)
            if feed is None:
                feed = Feed(
                    cluster=self,
                    session=session,
                    watcher=watcher,
                    budget=self.relay.config.viewer_queue_bytes,
                )
                session.hub.feeds[watcher] = feed
                assert self.nursery is not None
                self.nursery.start_soon(feed.run)
            own_id = feed.by_watcher.get(request.viewer)
            if own_id is None:
                own_id = next(self.relay._viewer_ids)
                feed.by_watcher[request.viewer] = own_id
                feed.ids[own_id] = request.viewer
            session.ensure_stream()
            session.command(attrs.evolve(request, viewer=own_id))
            self.relay._changed(session)
        elif feed is None:
            return
        elif kind == "remove":
            own_id = feed.by_watcher.pop(int(obj.get("viewer", 0)), None)
            if own_id is not None:
                feed.ids.pop(own_id, None)
                session.remove_remote_viewer(own_id)
            if not feed.ids:
                self._drop_feed(session, feed)
        elif kind == "unwatch":
            for own_id in list(feed.ids):
                session.remove_remote_viewer(own_id)
            feed.ids.clear()
            self._drop_feed(session, feed)
        elif kind == "sync":
            session.request_sync()

    def _drop_feed(self, session: Session, feed: Feed) -> None:
        feed.closed = True
        feed.wake.set()
        session.hub.feeds.pop(feed.watcher, None)
        session.maybe_stop_stream()
        self.relay._changed(session)

    def _on_feed(self, data: bytes) -> None:
        kind, seq, sid_len = _FEED_HEAD.unpack_from(data)
        start = _FEED_HEAD.size
        session_id = data[start : start + sid_len].decode()
        self.feed_bytes_in += len(data)
        self.feed_messages_in += 1
        remote = self.remote.get(session_id)
        if remote is not None:
            self._heard_from(remote.owner)
            remote.on_feed(kind, seq, data[start + sid_len :])
        else:
            # Viewers of a session that moved here are served locally now.
            pass

    def statistics(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "connected": self.bridge.connected,
            "peers": sorted(self.peers),
            "remote_sessions": len(self.remote),
            "feeds": sum(len(s.hub.feeds) for s in self.relay.sessions.values()),
            "feed_bytes_out": self.feed_bytes_out,
            "feed_bytes_in": self.feed_bytes_in,
            "feed_messages_in": self.feed_messages_in,
            "cluster_overflows": self.overflows,
            "cluster_overflow_gaps": self.gaps_sent,
            "feed_holes": self.feed_holes,
            "nats_published": self.bridge.published,
            "nats_received": self.bridge.received,
            "nats_inbox_drops": self.bridge.inbox_drops,
            "nats_reconnects": self.bridge.reconnects,
            "nats_pending_bytes": self.bridge.pending_bytes,
        }


async def serve_cluster(
    relay: Relay, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
) -> None:
    """Join ``relay`` to the cluster its config names; runs until cancelled."""
    config = relay.config
    assert config.cluster
    servers = [s.strip() for s in config.cluster.split(",") if s.strip()]
    name = config.relay_name or default_relay_name(relay.agent_port)
    cluster = Cluster(relay, servers, name)
    relay.cluster = cluster
    async with trio.open_nursery() as nursery:
        await nursery.start(cluster.run)
        task_status.started(cluster)

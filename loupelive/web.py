"""The web viewer: a single page and a WebSocket endpoint, served by the relay.

Theory of operation
-------------------
``serve --web HOST:PORT`` runs :func:`serve_web` beside the relay's ports.  Each
TCP connection (TLS when the relay has TLS, with the viewer port's context) is
one HTTP/1.1 request parsed with ``h11``: ``GET /``, ``/app.js`` and
``/style.css`` return the page (shipped in ``loupelive/web_static``; no build
step, nothing from a CDN), and ``GET /ws`` with an ``Upgrade: websocket`` header
becomes a WebSocket driven by ``wsproto`` under our own Trio tasks
(permessage-deflate when the browser offers it).

The page speaks JSON over the socket (ARCHITECTURE.md §6).  Its first message
must be ``auth`` with the viewer token (typed into a login form and kept in the
tab's ``sessionStorage``: never in a URL, so never in a log).  The gateway
then uses the relay like any viewer, through :meth:`Relay.local_connector`
(in-memory, no TLS, same token rules):

* each browser connection has its own viewer control connection, so the
  session list, its counters and pause/resume behave exactly as for the CLI;
* each watched session has **one tap** (:class:`Tap`) for all browsers: a
  single viewer stream at the lowest level, decoded once, each record turned
  into JSON once and kept in a bounded ring (recent history for browsers that
  join later).  Browsers cannot decode our brotli stream, so this is where the
  decoding happens, once per session rather than once per browser.

Each browser subscription filters by its own minimum level (in the relay: the
browser's link carries only what it shows) and gets records in ``records``
batches.  Flow control follows the viewer policy: a browser's outgoing queue
has a byte budget; over it, its subscriptions skip records and are later told
the exact range lost (a ``gap``, reason ``viewer_slow``); a subscription that
stays behind ``slow_viewer_timeout`` or loses more than ``slow_viewer_max_loss``
ends with ``slow_consumer``; a browser whose socket makes no progress for
``send_timeout`` is closed.  A tap is itself a viewer of the relay and subject
to the same policy; what it loses reaches the browsers as gaps.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hmac
import importlib.resources
import json
import logging
import math
from collections.abc import Iterator
from typing import Any, Final

import attrs
import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from . import __version__
from ._util import peer_name
from .errors import ConnectionClosed, ErrorCode, HandshakeRejected, LoupeError
from .messages import VIEWER_ROLES, SessionAdded, SessionChanged, SessionCounts, SessionEnded, SessionInfo
from .records import Gap, Record
from .relay import Relay
from .viewer import Stream, Viewer

__all__ = ["WebGateway", "serve_web"]

log = logging.getLogger("loupelive.web")

#: The largest HTTP request head we read (browsers send 1–2 KiB).
MAX_REQUEST_HEAD: Final = 16 * 1024
#: The largest message a browser may send (they are small commands).
MAX_CLIENT_MESSAGE: Final = 64 * 1024
#: Records a tap keeps for browsers that join later.
TAP_HISTORY: Final = 10_000
#: Records asked of the agent when a tap starts (recent history).
TAP_AGENT_HISTORY: Final = 5_000
#: History a browser gets unless it asks for a number.
DEFAULT_HISTORY: Final = 1_000
#: Records per ``records`` message.
RECORDS_PER_MESSAGE: Final = 500
#: Sessions a browser may watch at once (its tabs).
MAX_SUBSCRIPTIONS: Final = 32
#: After its last browser leaves, a tap stays this long (switching tabs or
#: changing a filter re-subscribes at once).
TAP_GRACE: Final = 10.0
#: The page (served from the package) and its content types.
STATIC_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
#: Headers on every HTTP answer: the page loads nothing from elsewhere, cannot
#: be framed, and leaks no referrer.
SECURITY_HEADERS: Final = [
    (
        b"Content-Security-Policy",
        b"default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
]

#: WebSocket close codes.
WS_POLICY: Final = 1008
WS_TOO_BIG: Final = 1009
WS_PROTOCOL: Final = 1002
WS_GOING_AWAY: Final = 1001


class ClientError(LoupeError):
    """A browser sent something we refuse; closes its socket with ``ws_code``."""

    def __init__(self, message: str, *, code: str = "malformed", ws_code: int = WS_POLICY) -> None:
        super().__init__(message)
        self.code = code
        self.ws_code = ws_code


def _static(name: str) -> bytes:
    return importlib.resources.files("loupelive").joinpath("web_static", name).read_bytes()


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _session_json(info: SessionInfo) -> dict[str, Any]:
    return info.to_json()


# -- taps ------------------------------------------------------------------------------


@attrs.define(eq=False)
class Subscription:
    """One browser tab watching one session."""

    client: WebClient
    sub: int
    session_id: str
    min_level: int
    #: The last seq delivered or accounted for (None: nothing yet).
    last_seq: int | None = None
    #: Records skipped while the browser was behind: (first, last), or None.
    skipped: tuple[int, int] | None = None
    skipping_since: float = math.inf
    offered: int = 0
    dropped: int = 0
    ended: bool = False
    #: Resuming after ``after_seq``: a hole before the first item is reported.
    resuming: bool = False
    #: Joined before the tap had its history: (history, after_seq) to serve then.
    waiting: tuple[int, int | None] | None = None


@attrs.define(eq=False)
class _Item:
    seq: int
    last_seq: int
    level: int
    #: A record's JSON (``kind`` "r") or a gap's (``kind`` "g").
    kind: str
    json: str


class Tap:
    """One viewer stream of one session, decoded once for every browser watching it."""

    def __init__(self, gateway: WebGateway, session_id: str) -> None:
        self.gateway = gateway
        self.session_id = session_id
        self.subs: set[Subscription] = set()
        self.ring: collections.deque[_Item] = collections.deque(maxlen=TAP_HISTORY)
        self.scope = trio.CancelScope()
        self.idle = trio.Event()
        self.ended: tuple[str, str] | None = None
        self.decoded = 0
        #: The agent's history has arrived: joining browsers are served from the ring.
        self.primed = False

    async def run(self, viewer: Viewer) -> None:
        code, reason = "closed", "the stream closed"
        try:
            with self.scope:
                async with (
                    viewer.open_stream(self.session_id, history=TAP_AGENT_HISTORY) as stream,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(self._prime_when_ready, stream)
                    await self._pump(stream)
                    nursery.cancel_scope.cancel()
                    end = stream.end_code
                    code = end.value if end else "closed"
                    reason = stream.end_reason or code
        except HandshakeRejected as exc:
            code, reason = exc.code.value, str(exc)
        except ConnectionClosed as exc:
            code, reason = exc.code.value, exc.reason
        except Exception:
            log.exception("web tap of session %s failed", self.session_id)
            code, reason = ErrorCode.INTERNAL.value, "internal error in the web viewer"
        finally:
            self.forget()
        if self.scope.cancelled_caught:
            return
        self.ended = (code, reason)
        for sub in list(self.subs):
            sub.client.end_subscription(sub, code, reason)
        self.subs.clear()

    def forget(self) -> None:
        """No new browser joins this tap (it is stopping or stopped)."""
        if self.gateway.taps.get(self.session_id) is self:
            del self.gateway.taps[self.session_id]

    async def _prime_when_ready(self, stream: Stream) -> None:
        # The pump flushes whenever nothing more is decoded, so when it waits
        # for the stream, everything decoded is in the ring.
        await stream.history_done.wait()
        self._prime()

    def _prime(self) -> None:
        """The history is in the ring: serve the browsers that were waiting for it."""
        if self.primed:
            return
        self.primed = True
        for sub in list(self.subs):
            if sub.waiting is not None:
                history, after_seq = sub.waiting
                sub.waiting = None
                sub.client.start(sub, self, history, after_seq)

    async def _pump(self, stream: Stream) -> None:
        pending: list[_Item] = []
        while True:
            try:
                item = await stream.__anext__()
            except StopAsyncIteration:
                break
            pending.append(self._encode(item))
            # Deliver when nothing more is ready (or a message's worth is).
            if stream.buffered == 0 or len(pending) >= RECORDS_PER_MESSAGE:
                self._flush(pending)
                pending = []
                if stream.history_done.is_set() and stream.buffered == 0:
                    self._prime()
        self._flush(pending)
        self._prime()

    def _flush(self, items: list[_Item]) -> None:
        if not items:
            return
        self.ring.extend(items)
        if not self.primed:
            return  # history: served from the ring when primed
        for sub in list(self.subs):
            if sub.waiting is None:
                sub.client.deliver(sub, items, history=False)

    def _encode(self, item: Record | Gap) -> _Item:
        self.decoded += 1
        if isinstance(item, Record):
            return _Item(item.seq, item.seq, int(item.level), "r", _dumps(item.to_json()))
        obj = {"first_seq": item.first_seq, "last_seq": item.last_seq, "reason": item.reason}
        return _Item(item.first_seq, item.last_seq, 255, "g", _dumps(obj))

    def history_for(self, count: int, min_level: int, after_seq: int | None) -> list[_Item]:
        """What a joining browser gets from the ring."""
        if after_seq is not None:
            return [item for item in self.ring if item.last_seq > after_seq]
        chosen: list[_Item] = []
        records = 0
        for item in reversed(self.ring):
            if records >= count:
                break
            if item.kind == "r":
                if item.level < min_level:
                    continue
                records += 1
            chosen.append(item)
        chosen.reverse()
        return chosen

    async def linger(self) -> None:
        """Stop the tap once nobody has watched it for TAP_GRACE seconds."""
        with trio.move_on_after(TAP_GRACE):
            while True:
                await self.idle.wait()
                if self.subs:
                    self.idle = trio.Event()
                    continue
                await trio.sleep_forever()
        if not self.subs:
            self.forget()
            self.scope.cancel()


# -- one browser ------------------------------------------------------------------------


class WebClient:
    """One browser's WebSocket: its commands in, its JSON messages out."""

    def __init__(self, gateway: WebGateway, stream: trio.abc.Stream, ws: WSConnection, name: str) -> None:
        self.gateway = gateway
        self.stream = stream
        self.ws = ws
        self.name = name
        config = gateway.relay.config
        self.budget = config.viewer_queue_bytes
        # Text messages, or wsproto events (pong, close) from the reader: one
        # writer task writes everything, in order.
        self.queue: collections.deque[str | Event] = collections.deque()
        self.queued_bytes = 0
        self.wake = trio.Event()
        self.subs: dict[int, Subscription] = {}
        self.viewer: Viewer | None = None
        self.closing: tuple[int, str] | None = None
        self.nursery: trio.Nursery | None = None
        self.bytes_out = 0

    # -- sending ------------------------------------------------------------------

    def send_event(self, event: Event) -> None:
        self.queue.append(event)
        self.wake.set()

    def send(self, obj: dict[str, Any] | str, *, force: bool = True) -> bool:
        """Queue a message; False (not queued) when over budget and not ``force``."""
        text = obj if isinstance(obj, str) else _dumps(obj)
        if not force and self.queued_bytes + len(text) > self.budget:
            return False
        self.queue.append(text)
        self.queued_bytes += len(text)
        self.wake.set()
        return True

    async def _writer(self) -> None:
        send_timeout = self.gateway.relay.config.send_timeout
        while True:
            while not self.queue:
                if self.closing is not None:
                    return
                await self.wake.wait()
                self.wake = trio.Event()
            item = self.queue.popleft()
            if isinstance(item, str):
                self.queued_bytes -= len(item)
                data = self.ws.send(TextMessage(data=item))
            else:
                data = self.ws.send(item)
            with trio.fail_after(send_timeout):
                await self.stream.send_all(data)
            self.bytes_out += len(data)
            if self.queued_bytes <= self.budget // 2:
                self._catch_up()

    def close(self, ws_code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (ws_code, reason)
        self.wake.set()

    # -- subscriptions ---------------------------------------------------------------

    def deliver(self, sub: Subscription, items: list[_Item], *, history: bool) -> None:
        """Send ``items`` that this subscription wants, or skip them if behind."""
        if sub.ended:
            return
        records: list[str] = []
        for item in items:
            if sub.last_seq is not None and item.last_seq <= sub.last_seq:
                continue
            if sub.resuming:
                # The first item after where a resumed tab stopped, whatever
                # its kind or level: a hole before it is reported.
                sub.resuming = False
                if sub.last_seq is not None and item.seq > sub.last_seq + 1:
                    # Resumed from before what the agent and the tap still hold.
                    self._flush_records(sub, records, history)
                    records = []
                    self.send(
                        {
                            "type": "gap",
                            "sub": sub.sub,
                            "first_seq": sub.last_seq + 1,
                            "last_seq": item.seq - 1,
                            "reason": "history_unavailable",
                        }
                    )
            if item.kind == "g":
                self._flush_records(sub, records, history)
                records = []
                self._gap_json(sub, item.json)
                sub.last_seq = item.last_seq
                continue
            if item.level < sub.min_level:
                sub.last_seq = item.seq
                continue
            sub.offered += 1
            if sub.skipped is not None or self.queued_bytes > self.budget:
                # Behind: skip, remember exactly what (told later as a gap).
                first = sub.skipped[0] if sub.skipped is not None else item.seq
                if sub.skipped is None:
                    sub.skipping_since = trio.current_time()
                    self._flush_records(sub, records, history)
                    records = []
                sub.skipped = (first, item.seq)
                sub.dropped += 1
                sub.last_seq = item.seq
                self.gateway.records_dropped += 1
                continue
            records.append(item.json)
            sub.last_seq = item.seq
            if len(records) >= RECORDS_PER_MESSAGE:
                self._flush_records(sub, records, history)
                records = []
        self._flush_records(sub, records, history)
        self._check_slow(sub)

    def _flush_records(self, sub: Subscription, records: list[str], history: bool) -> None:
        if records:
            self.send(
                f'{{"type":"records","sub":{sub.sub},"history":{"true" if history else "false"},'
                f'"records":[{",".join(records)}]}}'
            )

    def _gap_json(self, sub: Subscription, gap_json: str) -> None:
        self.send(f'{{"type":"gap","sub":{sub.sub},{gap_json[1:]}')

    def _catch_up(self) -> None:
        """The queue drained below half its budget: tell skipping subscriptions what they lost."""
        for sub in list(self.subs.values()):
            if sub.skipped is not None and not sub.ended:
                self._report_skipped(sub)

    def _report_skipped(self, sub: Subscription) -> None:
        """A ``viewer_slow`` gap naming exactly what ``sub`` skipped; it stops skipping."""
        assert sub.skipped is not None
        first, last = sub.skipped
        sub.skipped = None
        sub.skipping_since = math.inf
        self.send(
            {"type": "gap", "sub": sub.sub, "first_seq": first, "last_seq": last, "reason": "viewer_slow"}
        )
        self.gateway.gaps_sent += 1

    def _check_slow(self, sub: Subscription) -> None:
        config = self.gateway.relay.config
        too_long = (
            sub.skipped is not None and trio.current_time() - sub.skipping_since > config.slow_viewer_timeout
        )
        too_lossy = (
            sub.offered >= config.slow_viewer_min_records
            and sub.dropped > sub.offered * config.slow_viewer_max_loss
        )
        if too_long or too_lossy:
            self.gateway.slow_disconnects += 1
            reason = (
                f"slow consumer: stayed behind for {config.slow_viewer_timeout:g} s"
                if too_long
                else f"slow consumer: lost {sub.dropped} of {sub.offered} records"
            )
            if sub.skipped is not None:
                self._report_skipped(sub)
            self.end_subscription(sub, ErrorCode.SLOW_CONSUMER.value, reason)
            self.gateway.unsubscribe(sub)

    def end_subscription(self, sub: Subscription, code: str, reason: str) -> None:
        if sub.ended:
            return
        sub.ended = True
        self.send({"type": "end", "sub": sub.sub, "code": code, "reason": reason})
        if self.subs.get(sub.sub) is sub:
            del self.subs[sub.sub]

    # -- commands ---------------------------------------------------------------------

    async def handle(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "watch":
            await self._watch(obj)
        elif kind == "unwatch":
            sub = self.subs.pop(_int(obj, "sub", 0, 2**31), None)
            if sub is not None:
                sub.ended = True
                self.gateway.unsubscribe(sub)
        elif kind == "pause_list":
            assert self.viewer is not None
            await self.viewer.pause_list()
        elif kind == "resume_list":
            assert self.viewer is not None
            await self.viewer.resume_list()
            self.send({"type": "snapshot", "sessions": [_session_json(s) for s in self.viewer.sessions()]})
        elif kind == "auth":
            raise ClientError("already authenticated")
        else:
            raise ClientError(f"unknown message type {kind!r}")

    async def _watch(self, obj: dict[str, Any]) -> None:
        sub_id = _int(obj, "sub", 0, 2**31)
        session_id = obj.get("session_id")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 64:
            raise ClientError("watch needs a session_id")
        history = min(_int(obj, "history", 0, 2**31, DEFAULT_HISTORY), TAP_HISTORY)
        min_level = _int(obj, "min_level", 0, 255, 0)
        after_seq = obj.get("after_seq")
        if after_seq is not None:
            after_seq = _int(obj, "after_seq", 0, 2**64 - 1)
        old = self.subs.pop(sub_id, None)
        if old is not None:
            old.ended = True
            self.gateway.unsubscribe(old)
        if len(self.subs) >= MAX_SUBSCRIPTIONS:
            self.send(
                {"type": "end", "sub": sub_id, "code": "limit_reached", "reason": "too many open sessions"}
            )
            return
        assert self.viewer is not None
        info = self.viewer.session(session_id)
        if info is None:
            self.send(
                {
                    "type": "end",
                    "sub": sub_id,
                    "code": "unknown_session",
                    "reason": "no live session with this id",
                }
            )
            return
        sub = Subscription(
            client=self,
            sub=sub_id,
            session_id=session_id,
            min_level=min_level,
            last_seq=after_seq,
            resuming=after_seq is not None,
        )
        self.subs[sub_id] = sub
        self.send({"type": "watching", "sub": sub_id, "session": _session_json(info)})
        tap = self.gateway.subscribe(sub)
        if tap.primed:
            self.start(sub, tap, history, after_seq)
        else:
            sub.waiting = (history, after_seq)

    def start(self, sub: Subscription, tap: Tap, history: int, after_seq: int | None) -> None:
        """Serve a new subscription its history from the tap's ring, then live."""
        if sub.ended:
            return
        self.deliver(sub, tap.history_for(history, sub.min_level, after_seq), history=True)
        self.send({"type": "live", "sub": sub.sub})

    # -- session list --------------------------------------------------------------------

    async def forward_list(self, viewer: Viewer) -> None:
        events = viewer.session_events()
        self.send({"type": "snapshot", "sessions": [_session_json(s) for s in viewer.sessions()]})
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, (SessionAdded, SessionChanged)):
                    self.send({"type": "session", "session": _session_json(event.session)})
                elif isinstance(event, SessionEnded):
                    final = event.session.to_json() if event.session is not None else None
                    self.send(
                        {
                            "type": "ended",
                            "session_id": event.session_id,
                            "status": event.status,
                            "reason": event.reason,
                            "session": final,
                        }
                    )
                elif isinstance(event, SessionCounts):
                    self.send({"type": "counts", "counts": [entry.to_json() for entry in event.counts]})


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ClientError(f"{key!r} must be an integer in {lo}..{hi}")
    return value


# -- the gateway -------------------------------------------------------------------------


class WebGateway:
    """The web viewer of one relay: its taps, its browsers, its counters."""

    def __init__(self, relay: Relay, nursery: trio.Nursery) -> None:
        self.relay = relay
        self.nursery = nursery
        self.taps: dict[str, Tap] = {}
        self.clients = 0
        self.records_dropped = 0
        self.gaps_sent = 0
        self.slow_disconnects = 0
        self.rejected = 0
        self._tap_viewer: Viewer | None = None
        self._tap_viewer_ready = trio.Event()

    def _new_viewer(self) -> Viewer:
        return Viewer(
            "local",
            0,
            token=self.relay._viewer_token,
            tls=False,
            ca_file=None,
            connector=self.relay.local_connector(),
        )

    def subscribe(self, sub: Subscription) -> Tap:
        tap = self.taps.get(sub.session_id)
        if tap is None:
            tap = Tap(self, sub.session_id)
            self.taps[sub.session_id] = tap
            self.nursery.start_soon(self._run_tap, tap)
        tap.subs.add(sub)
        return tap

    async def _run_tap(self, tap: Tap) -> None:
        await self._tap_viewer_ready.wait()
        assert self._tap_viewer is not None
        await tap.run(self._tap_viewer)

    def unsubscribe(self, sub: Subscription) -> None:
        tap = self.taps.get(sub.session_id)
        if tap is None or sub not in tap.subs:
            return
        tap.subs.discard(sub)
        if not tap.subs:
            tap.idle.set()
            self.nursery.start_soon(tap.linger)

    async def run_tap_viewer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The in-process viewer that every tap's stream runs on."""
        from .viewer import open_viewer

        async with open_viewer(
            "local", 0, token=self.relay._viewer_token, connector=self.relay.local_connector()
        ) as viewer:
            self._tap_viewer = viewer
            self._tap_viewer_ready.set()
            task_status.started()
            await trio.sleep_forever()

    # -- connections --------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream) -> None:
        name = peer_name(stream)
        context = self.relay._ssl_contexts.get(VIEWER_ROLES)
        if context is not None:
            stream = trio.SSLStream(stream, context, server_side=True)
        try:
            await self._handle_http(stream, name)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
            log.debug("web %s: %s", name, exc or type(exc).__name__)
        except Exception:
            log.exception("web %s: internal error", name)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_http(self, stream: trio.abc.Stream, name: str) -> None:
        config = self.relay.config
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        with trio.fail_after(config.handshake_timeout):
            while True:
                try:
                    event = http.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._respond(stream, http, 400, f"bad request: {exc}".encode())
                    return
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_REQUEST_HEAD)
                    http.receive_data(bytes(data))
                    if not data:
                        return
                    continue
                break
        if not isinstance(event, h11.Request):
            return
        target = event.target.decode("ascii", "replace").split("?", 1)[0]
        headers = {k.lower(): v for k, v in event.headers}
        if target == "/ws":
            if headers.get(b"upgrade", b"").lower() != b"websocket":
                await self._respond(stream, http, 426, b"WebSocket upgrade required")
                return
            if not _same_origin(headers):
                self.rejected += 1
                await self._respond(stream, http, 403, b"cross-origin WebSocket refused")
                return
            await self._serve_ws(stream, event, http.trailing_data[0], name)
            return
        if event.method not in (b"GET", b"HEAD"):
            await self._respond(stream, http, 405, b"method not allowed")
            return
        static = STATIC_FILES.get(target)
        if static is None:
            await self._respond(stream, http, 404, b"not found")
            return
        filename, content_type = static
        body = _static(filename)
        await self._respond(stream, http, 200, body, content_type, head=event.method == b"HEAD")

    @staticmethod
    async def _respond(
        stream: trio.abc.Stream,
        http: h11.Connection,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        head: bool = False,
    ) -> None:
        headers = [
            (b"Content-Type", content_type.encode()),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            *SECURITY_HEADERS,
        ]
        try:
            data = http.send(h11.Response(status_code=status, headers=headers))
            if not head:
                data += http.send(h11.Data(data=body))
            data += http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        await stream.send_all(data)

    async def _serve_ws(self, stream: trio.abc.Stream, request: h11.Request, rest: bytes, name: str) -> None:
        config = self.relay.config
        ws = WSConnection(ConnectionType.SERVER)
        ws.initiate_upgrade_connection(list(request.headers), request.target)
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection(extensions=[PerMessageDeflate()])))
                break
        else:
            return
        if self.clients >= config.max_viewer_connections:
            await stream.send_all(ws.send(CloseConnection(code=WS_GOING_AWAY, reason="too many viewers")))
            return
        if rest:
            ws.receive_data(rest)
        client = WebClient(self, stream, ws, name)
        self.clients += 1
        try:
            async with trio.open_nursery() as nursery:
                client.nursery = nursery
                nursery.start_soon(self._serve_client, client, nursery.cancel_scope)
                try:
                    await client._writer()
                finally:
                    nursery.cancel_scope.cancel()
            if client.closing is not None and client.closing[0]:
                code, reason = client.closing
                with (
                    trio.move_on_after(1.0),
                    contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, WSLocalProtocolError
                    ),
                ):
                    await stream.send_all(ws.send(CloseConnection(code=code, reason=reason[:120])))
        finally:
            self.clients -= 1
            for sub in list(client.subs.values()):
                sub.ended = True
                self.unsubscribe(sub)

    async def _serve_client(self, client: WebClient, scope: trio.CancelScope) -> None:
        """Read the browser's messages: auth first, then commands."""
        config = self.relay.config
        try:
            with trio.fail_after(config.handshake_timeout):
                first = await self._next_message(client)
            if first is None:
                client.close(0, "")
                return
            token = first.get("token") if first.get("type") == "auth" else None
            if first.get("type") != "auth" or not isinstance(token, str | None):
                raise ClientError("the first message must be auth", code="unauthenticated")
            expected = self.relay._viewer_token
            if expected is not None and not hmac.compare_digest((token or "").encode(), expected.encode()):
                self.rejected += 1
                self.relay._reject_count(ErrorCode.BAD_TOKEN)
                raise ClientError("missing or wrong token", code=ErrorCode.BAD_TOKEN.value)
            client.send({"type": "welcome", "relay": f"loupelive/{__version__}", "history": DEFAULT_HISTORY})
            async with self._client_viewer() as viewer:
                client.viewer = viewer
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.forward_list, viewer)
                    while True:
                        message = await self._next_message(client)
                        if message is None:
                            client.close(0, "")
                            nursery.cancel_scope.cancel()
                            return
                        await client.handle(message)
        except ClientError as exc:
            log.info("web %s: %s", client.name, exc)
            client.send({"type": "error", "code": exc.code, "reason": str(exc)})
            client.close(exc.ws_code, str(exc))
        except trio.TooSlowError:
            client.send({"type": "error", "code": "timeout", "reason": "no auth message in time"})
            client.close(WS_POLICY, "no auth message in time")
        except (ConnectionClosed, LoupeError) as exc:
            client.send({"type": "error", "code": "relay", "reason": str(exc)})
            client.close(WS_GOING_AWAY, "lost the relay")
        finally:
            # However this ended, the writer finishes what is queued and stops.
            client.close(WS_GOING_AWAY, "the relay is closing this connection")

    @contextlib.asynccontextmanager
    async def _client_viewer(self) -> Any:
        from .viewer import open_viewer

        async with open_viewer(
            "local", 0, token=self.relay._viewer_token, connector=self.relay.local_connector()
        ) as viewer:
            yield viewer

    async def _next_message(self, client: WebClient) -> dict[str, Any] | None:
        """The browser's next JSON message; None when it closed."""
        parts: list[str] = []
        size = 0
        while True:
            for event in _events(client.ws):
                if isinstance(event, TextMessage):
                    size += len(event.data)
                    if size > MAX_CLIENT_MESSAGE:
                        raise ClientError("message too large", code="too_large", ws_code=WS_TOO_BIG)
                    parts.append(event.data)
                    if event.message_finished:
                        return _parse("".join(parts))
                elif isinstance(event, BytesMessage):
                    raise ClientError("binary messages are not accepted", ws_code=WS_PROTOCOL)
                elif isinstance(event, CloseConnection):
                    client.queue.clear()
                    client.send_event(event.response())
                    return None
                elif isinstance(event, Ping):
                    client.send_event(event.response())
            data = await client.stream.receive_some(65536)
            if not data:
                return None
            try:
                client.ws.receive_data(bytes(data))
            except WSRemoteProtocolError as exc:
                raise ClientError(f"WebSocket protocol error: {exc}", ws_code=WS_PROTOCOL) from exc


def _events(ws: WSConnection) -> Iterator[Any]:
    try:
        yield from ws.events()
    except WSRemoteProtocolError as exc:
        raise ClientError(f"WebSocket protocol error: {exc}", ws_code=WS_PROTOCOL) from exc


def _parse(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ClientError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ClientError("messages must be JSON objects")
    return obj


def _same_origin(headers: dict[bytes, bytes]) -> bool:
    """Browsers send Origin on WebSocket upgrades; it must name this host.

    Refuses cross-site WebSocket hijacking (a page elsewhere opening a socket to
    the relay with the user's network position).  Non-browser clients that send
    no Origin are let through: they must still present the token.
    """
    origin = headers.get(b"origin")
    if origin is None:
        return True
    host = headers.get(b"host", b"")
    return origin.split(b"://", 1)[-1].rstrip(b"/").lower() == host.lower()


async def serve_web(
    relay: Relay,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the web viewer for ``relay`` on ``host:port`` until cancelled.

    Calls ``task_status.started(port)`` with the bound port once listening.

    Raises:
      OSError: the port cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        gateway = WebGateway(relay, nursery)
        relay.web = gateway
        task_status_port = bound
        await nursery.start(gateway.run_tap_viewer)
        nursery.start_soon(
            functools.partial(trio.serve_listeners, gateway.handle, listeners, handler_nursery=nursery)
        )
        log.info("web viewer on http%s://%s:%d/", "s" if relay._ssl_contexts else "", host, bound)
        task_status.started(task_status_port)

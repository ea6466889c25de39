"""One Trio stream plus the frame codec: the boundary where errors are translated.

Theory of operation
-------------------
A :class:`Connection` owns a Trio stream (TCP or ``trio.SSLStream``) and a
:class:`~loupelive.wire.FrameDecoder`.  It has exactly one reader (whoever calls
:meth:`Connection.receive`) and any number of writers serialised by a lock, so
frames never interleave.  A send that is cancelled or fails half-way may have left
part of a frame on the wire, so the connection then counts as broken: every later
operation raises :class:`ConnectionClosed`.  A connection that failed stays failed.

Trio's ``BrokenResourceError`` / ``ClosedResourceError`` and the peer's ``CLOSE``
frame all surface as :class:`ConnectionClosed` with an :class:`ErrorCode`, so role
code deals with one error type.  Heartbeats are a task
(:meth:`Connection.serve_heartbeats`) that sends one whenever the connection has
been quiet for an interval and raises ``ConnectionClosed(timeout)`` when the peer
has been silent past its deadline; run it in the connection's nursery so the
timeout tears the connection's tasks down.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ErrorCode,
    HandshakeRejected,
    LocalProtocolError,
    RemoteProtocolError,
)
from .messages import Accept, Close, Heartbeat, Hello, Message, Reject, decode_message, encode_message
from .wire import (
    MAX_CONTROL_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameKind,
    Preamble,
    encode_preamble,
)

__all__ = ["Connection", "Connector", "connect"]

#: How a client opens its byte stream to ``(host, port)``; TCP by default.
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]

#: Bytes asked for per read: large enough that a busy data connection needs few
#: reads (NOTES.md: 256 KiB reads are markedly faster for bulk), small enough
#: that idle connections cost little (Trio allocates per call, not per stream).
RECEIVE_SIZE: Final = 256 * 1024

#: Writes are split into chunks of this size for the send deadline.
SEND_CHUNK: Final = 64 * 1024

#: Writes up to this size are shielded from cancellation (see send_raw).
SHIELDED_SEND_MAX: Final = 4096

#: How long a CLOSE frame may take to leave before we give up and just close.
CLOSE_SEND_TIMEOUT: Final = 1.0

#: How long a client waits for the relay's answer to its HELLO (seconds).
HANDSHAKE_TIMEOUT: Final = 10.0


class Connection:
    """A framed loupelive connection over a Trio stream.

    Args:
      stream: the byte stream (its ownership passes to the connection).
      max_payload: the largest frame payload accepted from the peer.
      name: how log messages and errors name this connection.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_payload: int,
        name: str = "",
        send_timeout: float = math.inf,
    ) -> None:
        self.stream = stream
        self.name = name
        #: A send that makes no progress for this long means the peer stopped
        #: reading (a stalled TCP peer): the connection fails with ``timeout``.
        self.send_timeout = send_timeout
        self._decoder = FrameDecoder(max_payload=max_payload)
        self._send_lock = trio.Lock()
        # Sending and receiving fail separately: after the peer sent garbage we
        # can (and should) still tell it why we are closing.
        self._closed: ConnectionClosed | None = None
        self._receive_error: Exception | None = None
        #: When the chunk being written started (None: no write in progress).
        self._send_progress: float | None = None
        self.last_sent = trio.current_time()
        self.last_received = trio.current_time()
        self.bytes_received = 0
        self.bytes_sent = 0
        #: Called with each heartbeat that carries clock fields (a probe or
        #: an answer), from inside :meth:`receive`, as soon as it is decoded.
        self.on_heartbeat: Callable[[Heartbeat], None] | None = None

    @property
    def max_payload(self) -> int:
        return self._decoder.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._decoder.max_payload = value

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _check(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _check_receive(self) -> None:
        if self._receive_error is not None:
            raise self._receive_error
        self._check()

    def _fail(self, reason: str, code: ErrorCode) -> ConnectionClosed:
        """The connection is unusable both ways."""
        if self._closed is None:
            self._closed = ConnectionClosed(reason, code=code)
        return self._closed

    def _fail_receive(self, error: Exception) -> Exception:
        """Nothing more can be received, but a CLOSE can still be sent."""
        if self._receive_error is None:
            self._receive_error = error
        return self._receive_error

    # -- sending ---------------------------------------------------------------

    async def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Write pre-encoded frames (and/or a preamble) as one unit.

        Raises:
          ConnectionClosed: the connection is (or just became) closed or broken.
        """
        self._check()
        async with self._send_lock:
            self._check()
            try:
                # Progress is stamped per chunk; the heartbeat task fails the
                # connection when a chunk makes no progress for send_timeout (a
                # peer that stopped reading, not a slow link).  A watchdog
                # instead of a cancel scope per write: sends are the hot path.
                view = memoryview(data)
                if len(view) <= SHIELDED_SEND_MAX:
                    # A small frame (a heartbeat, a command, a CLOSE) is
                    # written whole even if our task is cancelled meanwhile:
                    # cancelling half-way would break the connection, and the
                    # peer would never learn why it is being closed.
                    with trio.CancelScope(shield=True) as shield:
                        # Bounded like any write: the watchdog fails a write
                        # that makes no progress for send_timeout.
                        shield.deadline = trio.current_time() + self.send_timeout + 1.0
                        self._send_progress = trio.current_time()
                        await self.stream.send_all(view)
                    if shield.cancelled_caught:
                        raise self._fail(f"{self.name}: a small write made no progress", ErrorCode.TIMEOUT)
                else:
                    for offset in range(0, len(view), SEND_CHUNK):
                        self._send_progress = trio.current_time()
                        await self.stream.send_all(view[offset : offset + SEND_CHUNK])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._fail(
                    f"{self.name}: send failed: {exc or type(exc).__name__}", ErrorCode.INTERNAL
                ) from exc
            except BaseException:
                # Cancelled half-way: part of a frame may be on the wire.
                self._fail(f"{self.name}: a send was interrupted", ErrorCode.INTERNAL)
                raise
            finally:
                self._send_progress = None
            self.last_sent = trio.current_time()
            self.bytes_sent += len(data)

    async def send(self, message: Message) -> None:
        """Send one message.

        Raises:
          ConnectionClosed: the connection is closed or broken.
          LocalProtocolError: the message does not fit in one frame.
        """
        data = encode_message(message)
        if len(data) > MAX_CONTROL_PAYLOAD + 5 and message.KIND is not FrameKind.BATCH:
            raise LocalProtocolError(f"{type(message).__name__} is too large for one frame")
        await self.send_raw(data)

    # -- receiving ---------------------------------------------------------------

    async def _receive_event(self) -> Preamble | Frame:
        self._check_receive()
        read_anything = False
        while True:
            try:
                event = self._decoder.next_event()
            except RemoteProtocolError as exc:
                raise self._fail_receive(exc) from None
            if event is not None:
                self.last_received = trio.current_time()
                if not read_anything:
                    # Served from the buffer: still a checkpoint, as every
                    # Trio receive must be, so one busy connection cannot
                    # starve the other tasks.
                    await trio.lowlevel.checkpoint()
                return event
            if self._decoder.at_eof:
                raise self._fail_receive(
                    ConnectionClosed(f"{self.name}: peer closed the connection", code=ErrorCode.INTERNAL)
                )
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._fail(
                    f"{self.name}: connection lost: {exc or type(exc).__name__}", ErrorCode.INTERNAL
                ) from exc
            except BaseException:
                raise
            read_anything = True
            self.bytes_received += len(data)
            self.last_received = trio.current_time()
            self._decoder.receive_data(data)

    async def receive_preamble(self) -> int:
        """Read the peer's preamble and return its protocol version."""
        event = await self._receive_event()
        if not isinstance(event, Preamble):  # pragma: no cover - decoder guarantees it
            raise RemoteProtocolError("expected the preamble", code=ErrorCode.BAD_MAGIC)
        return event.version

    async def receive(self) -> Frame:
        """Return the next frame other than a heartbeat.

        A ``CLOSE`` from the peer raises :class:`ConnectionClosed` with its code.

        Raises:
          ConnectionClosed: the peer closed, the connection broke, or a CLOSE arrived.
          RemoteProtocolError: the peer sent malformed framing.
        """
        while True:
            event = await self._receive_event()
            if not isinstance(event, Frame):  # pragma: no cover
                raise RemoteProtocolError("unexpected second preamble")
            if event.kind is FrameKind.HEARTBEAT:
                if self.on_heartbeat is not None and len(event.payload) > 2:
                    heartbeat = decode_message(event)
                    assert isinstance(heartbeat, Heartbeat)
                    self.on_heartbeat(heartbeat)
                continue
            if event.kind is FrameKind.CLOSE:
                close = decode_message(event)
                assert isinstance(close, Close)
                raise self._fail_receive(
                    ConnectionClosed(close.reason or "peer closed the connection", code=close.code)
                )
            return event

    async def receive_message(self) -> Message:
        """Like :meth:`receive`, decoded as a JSON message (not for BATCH frames)."""
        return decode_message(await self.receive())

    # -- liveness and closing ---------------------------------------------------

    async def serve_heartbeats(self, interval: float, silence: float) -> None:
        """Send heartbeats when quiet; raise when the peer is silent too long.

        Runs until cancelled.

        Raises:
          ConnectionClosed: ``silence`` seconds passed without a byte from the peer,
            or the connection closed.
        """
        while True:
            now = trio.current_time()
            if now - self.last_received >= silence:
                raise self._fail_receive(
                    ConnectionClosed(f"{self.name}: peer silent for {silence:g} s", code=ErrorCode.TIMEOUT)
                )
            started = self._send_progress
            if started is not None and now - started >= self.send_timeout:
                # The peer stopped reading: fail the connection, which also
                # ends the blocked write.
                error = self._fail(
                    f"{self.name}: peer stopped reading (a write made no progress for {self.send_timeout:g} s)",
                    ErrorCode.TIMEOUT,
                )
                await trio.aclose_forcefully(self.stream)
                raise error
            if now - self.last_sent >= interval and not self._send_lock.locked():
                # A stalled peer must not wedge this task, the watchdog: bound
                # the (rare) heartbeat write itself.
                with trio.move_on_after(self.send_timeout):
                    await self.send(Heartbeat())
            self._check()
            wake = min(self.last_sent + interval, self.last_received + silence)
            if self._send_progress is not None:
                wake = min(wake, self._send_progress + self.send_timeout)
            await trio.sleep_until(max(wake, trio.current_time() + interval / 10))

    async def aclose(self, code: ErrorCode | None = None, reason: str = "") -> None:
        """Close, first telling the peer why (best effort) if ``code`` is given."""
        if code is not None and self._closed is None:
            # Waits (briefly) for a send in progress to finish, rather than
            # leaving the peer without the reason.
            with trio.move_on_after(CLOSE_SEND_TIMEOUT) as scope:
                scope.shield = True
                try:
                    await self.send(Close(code=code, reason=reason))
                except ConnectionClosed:
                    pass
        self._fail(reason or f"{self.name}: closed", code or ErrorCode.INTERNAL)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _client_ssl_context(tls: bool | ssl.SSLContext, cafile: str | None) -> ssl.SSLContext | None:
    if tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def connect(
    host: str,
    port: int,
    hello: Hello,
    *,
    tls: bool | ssl.SSLContext = False,
    ca_file: str | None = None,
    max_payload: int = MAX_CONTROL_PAYLOAD,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    connector: Connector | None = None,
) -> tuple[Connection, Accept]:
    """Open a connection to a relay and complete the handshake.

    Returns:
      The connection (its preamble and HELLO exchanged) and the relay's ACCEPT.

    Raises:
      OSError: the relay cannot be reached.
      HandshakeRejected: the relay refused (``AuthenticationError`` for tokens).
      ConnectionClosed: the relay closed or did not answer in time.
      RemoteProtocolError: the peer is not a loupelive relay.
    """
    context = _client_ssl_context(tls, ca_file)
    tcp = await (connector or trio.open_tcp_stream)(host, port)
    stream: trio.abc.Stream = tcp
    if context is not None:
        stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=False)
    conn = Connection(stream, max_payload=max_payload, name=f"relay {host}:{port}")
    try:
        with trio.fail_after(handshake_timeout):
            if isinstance(stream, trio.SSLStream):
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    cause = exc.__cause__
                    hint = (
                        ""
                        if isinstance(cause, ssl.SSLCertVerificationError)
                        else " (if the relay does not use TLS, connect without TLS)"
                    )
                    raise ConnectionClosed(
                        f"TLS handshake with {host}:{port} failed: {cause or exc}{hint}",
                        code=ErrorCode.BAD_MAGIC,
                    ) from exc
            await conn.send_raw(encode_preamble() + encode_message(hello))
            try:
                version = await conn.receive_preamble()
            except (RemoteProtocolError, ConnectionClosed) as exc:
                if context is not None:
                    raise
                # A TLS relay fails its handshake on our plaintext preamble:
                # it answers with a TLS alert record (0x15) or just closes.
                raise ConnectionClosed(
                    f"relay {host}:{port} did not answer the loupelive handshake ({exc}); "
                    "if the relay uses TLS, connect with TLS (--tls)",
                    code=ErrorCode.BAD_MAGIC,
                ) from exc
            frame = await conn.receive()
            if frame.kind is FrameKind.REJECT:
                reject = decode_message(frame)
                assert isinstance(reject, Reject)
                error = AuthenticationError if reject.code is ErrorCode.BAD_TOKEN else HandshakeRejected
                raise error(reject.reason, code=reject.code)
            if version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"relay speaks protocol version {version}, we speak {PROTOCOL_VERSION}",
                    code=ErrorCode.UNSUPPORTED_VERSION,
                )
            if frame.kind is not FrameKind.ACCEPT:
                raise RemoteProtocolError(
                    f"expected ACCEPT, got {frame.kind.name}", code=ErrorCode.UNEXPECTED_MESSAGE
                )
            accept = decode_message(frame)
            assert isinstance(accept, Accept)
            # The relay heartbeats every interval; a write blocked for three
            # intervals means it stopped reading.
            conn.send_timeout = accept.heartbeat_interval * 3
    except trio.TooSlowError as exc:
        await conn.aclose()
        raise ConnectionClosed(
            f"relay {host}:{port} did not complete the handshake in {handshake_timeout:g} s",
            code=ErrorCode.TIMEOUT,
        ) from exc
    except BaseException:
        await conn.aclose()
        raise
    return conn, accept

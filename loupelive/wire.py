"""The frame codec: bytes in, frames out, and the reverse.  No I/O at all.

Theory of operation
-------------------
A loupelive connection starts with a 10-byte *preamble* in each direction: the
8-byte :data:`MAGIC` and a big-endian ``u16`` protocol version.  After it, both
directions carry *frames*::

    +----------------+---------+------------------------+
    | length: u32 BE | kind:u8 | payload (length bytes) |
    +----------------+---------+------------------------+

``length`` counts the payload only.  Each connection has a maximum payload size
(:data:`MAX_CONTROL_PAYLOAD` on control connections, :data:`MAX_DATA_PAYLOAD` on
data connections); a header that announces more is an error before a single
payload byte is buffered, so a peer can never make us buffer more than one
maximum frame.

:class:`FrameDecoder` works like h11's connection: feed it whatever bytes arrived
with :meth:`~FrameDecoder.receive_data` (``b""`` means end of file) and pull
events with :meth:`~FrameDecoder.next_event`, which returns ``None`` when it
needs more bytes.  Malformed input raises :class:`RemoteProtocolError` with the
:class:`ErrorCode` to send back; the decoder then stays failed.

The preamble check sniffs what a wrong peer is: a TLS ClientHello (first byte
``0x16``) or an HTTP request (an ASCII method and a space) gets its own error
code, so the relay can answer an HTTP client with a plain ``400`` and log a TLS
client as "this port is plaintext".
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

from .errors import ErrorCode, RemoteProtocolError

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_PAYLOAD",
    "PREAMBLE",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "Preamble",
    "encode_frame",
]

#: First bytes of every loupelive connection, in both directions.  Like PNG's
#: signature: a non-ASCII first byte (so it is neither text nor a TLS record),
#: the name, and CR LF (so a line-ending translating middlebox is caught).
MAGIC: Final = b"\x8bLOUPE\r\n"

#: The protocol version this code speaks.  A relay rejects any other version
#: with ``unsupported_version``; the preamble, the frame header and the
#: HELLO / ACCEPT / REJECT / CLOSE frames keep their layout in every version, so
#: that rejection can always be read.
PROTOCOL_VERSION: Final = 1

#: Magic + version.
PREAMBLE: Final = struct.Struct(">8sH")

#: Payload length + kind.
HEADER: Final = struct.Struct(">IB")

#: Control messages are small JSON objects; the largest is a session list
#: snapshot, which is sent as one SESSION_ADDED frame per session rather than
#: one frame, so 256 KiB leaves room for a session with many tags.
MAX_CONTROL_PAYLOAD: Final = 256 * 1024

#: Data frames carry one compressed batch.  Agents cut batches at 256 KiB of
#: *uncompressed* records, so a compressed batch is far below this; 1 MiB bounds
#: what a relay buffers per data connection while still fitting any sane batch.
MAX_DATA_PAYLOAD: Final = 1024 * 1024

_HTTP_METHODS: Final = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI ",
)
_TLS_HANDSHAKE_RECORD: Final = 0x16


class FrameKind(enum.IntEnum):
    """Every frame kind.  Payloads are UTF-8 JSON objects except where noted."""

    # -- handshake (layout frozen across protocol versions) --------------------
    #: Client → relay, first frame: role, token, role-specific parameters.
    HELLO = 1
    #: Relay → client: the HELLO was accepted; relay parameters.
    ACCEPT = 2
    #: Relay → client: the HELLO was refused (``code``, ``reason``); then close.
    REJECT = 3
    #: Either way: "I am closing this connection" (``code``, ``reason``).
    CLOSE = 4
    # -- every connection ------------------------------------------------------
    #: Either way: liveness, sent when nothing else was sent for a while.
    #: On agent control connections it also carries the relay's clock probes
    #: (``time``) and the agent's answers (``time``, ``echo``, ``hold``).
    HEARTBEAT = 5
    # -- agent control ---------------------------------------------------------
    #: Relay → agent: open a data connection for stream number ``stream``.
    START_STREAM = 10
    #: Relay → agent: finish and close the data connection of ``stream``.
    STOP_STREAM = 11
    #: Relay → agent: a viewer joined (``viewer``, ``history``, ``min_level``).
    ADD_VIEWER = 12
    #: Relay → agent: a viewer left (``viewer``).
    REMOVE_VIEWER = 13
    #: Relay → agent: start a fresh compression context at the next batch.
    REQUEST_SYNC = 14
    #: Agent → relay: the session ends normally (after its data is flushed).
    GOODBYE = 15
    #: Agent → relay: the session's record counters (``records``, ``critical``,
    #: ``errors``, ``warnings``, ``last_record_at``), at most once a second and
    #: only when they changed.
    COUNTS = 16
    # -- viewer control --------------------------------------------------------
    #: Relay → viewer: a session is live (sent for each session at connect, then
    #: for each new one), with the full SessionInfo.
    SESSION_ADDED = 20
    #: Relay → viewer: a session's information changed (full SessionInfo).
    SESSION_CHANGED = 21
    #: Relay → viewer: a session ended (``session_id``, ``reason``).
    SESSION_ENDED = 22
    #: Relay → viewer: the initial snapshot is complete (``count``).
    SNAPSHOT_END = 23
    #: Viewer → relay: send the relay's statistics (``detail``: per session too).
    GET_STATS = 24
    #: Relay → viewer: the statistics (``stats``: an object, see RelayStatistics).
    STATS = 25
    #: Relay → viewer: live counters and clock estimates of sessions that
    #: changed (``counts``: a list), at most once a second.
    SESSION_COUNTS = 26
    #: Viewer → relay: stop sending session-list updates.
    PAUSE_LIST = 27
    #: Viewer → relay: send a fresh snapshot (SNAPSHOT_BEGIN, SESSION_ADDED…,
    #: SNAPSHOT_END), then updates again.
    RESUME_LIST = 28
    #: Relay → viewer: a fresh snapshot follows (after RESUME_LIST): forget the
    #: list held so far.
    SNAPSHOT_BEGIN = 29
    # -- data connections ------------------------------------------------------
    #: Agent → relay → viewer: one compressed batch of records.  Binary payload:
    #: a 29-byte header then brotli bytes (see ``loupelive.records``).
    BATCH = 30
    #: Records that a viewer will not get (``first_seq``, ``last_seq``,
    #: ``reason``, and from the agent, optionally ``viewer``).
    GAP = 31
    #: The stream is over (``code``, ``reason``, ``last_seq``); then close.
    STREAM_END = 32


_KINDS: Final = frozenset(int(kind) for kind in FrameKind)


@attrs.frozen
class Preamble:
    """The peer's preamble: which protocol version it speaks."""

    version: int


@attrs.frozen
class Frame:
    """One frame: its kind and its raw payload."""

    kind: FrameKind
    payload: bytes


def encode_preamble(version: int = PROTOCOL_VERSION) -> bytes:
    """Return the 10 preamble bytes for ``version``."""
    return PREAMBLE.pack(MAGIC, version)


def encode_frame(kind: FrameKind, payload: bytes = b"") -> bytes:
    """Return one frame as bytes, ready to write.

    The caller is responsible for the payload size; the limit is checked by the
    receiving side (and by :class:`loupelive.connection.Connection` before sending).
    """
    return HEADER.pack(len(payload), kind) + payload


def _http_undecided(data: bytes) -> bool:
    """True while ``data`` could still become an HTTP method or something else."""
    upper = data.upper()
    if any(upper.startswith(m) for m in _HTTP_METHODS):
        return False
    return any(m.startswith(upper) and len(upper) < len(m) for m in _HTTP_METHODS)


def classify_bad_preamble(data: bytes) -> ErrorCode:
    """Say what a peer whose first bytes are ``data`` (not our magic) speaks."""
    if data[:1] == bytes([_TLS_HANDSHAKE_RECORD]):
        return ErrorCode.TLS_ON_PLAINTEXT
    upper = data.upper()
    if any(upper.startswith(m) or (len(upper) < len(m) and m.startswith(upper)) for m in _HTTP_METHODS):
        return ErrorCode.HTTP_REQUEST
    return ErrorCode.BAD_MAGIC


_BAD_PREAMBLE_TEXT: Final = {
    ErrorCode.TLS_ON_PLAINTEXT: "peer sent a TLS ClientHello to a plaintext port",
    ErrorCode.HTTP_REQUEST: "peer sent an HTTP request to a loupelive port",
    ErrorCode.BAD_MAGIC: "peer does not speak the loupelive protocol (bad magic)",
}


class FrameDecoder:
    """Turns received bytes into :class:`Preamble` and :class:`Frame` events.

    Args:
      max_payload: the largest payload accepted; larger announced frames raise
        ``frame_too_large`` as soon as their header is read.
      expect_preamble: whether the stream starts with a preamble (it does on a
        fresh connection; tests of frame parsing can turn it off).
    """

    def __init__(self, *, max_payload: int, expect_preamble: bool = True) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        # Consumed bytes are skipped with an offset and dropped in one go once
        # they are half the buffer: deleting per frame would be quadratic when
        # one read brings many small frames.
        self._start = 0
        self._need_preamble = expect_preamble
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buffer) - self._start

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise RuntimeError("receive_data() after end of file")
        if not data:
            self._eof = True
        else:
            if self._start and self._start * 2 >= len(self._buffer):
                del self._buffer[: self._start]
                self._start = 0
            self._buffer += data

    def next_event(self) -> Preamble | Frame | None:
        """Return the next complete event, or ``None`` if more bytes are needed.

        Raises:
          RemoteProtocolError: the bytes are not valid loupelive framing.  The
            decoder stays failed: later calls raise the same error.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Preamble | Frame | None:
        buf = self._buffer
        start = self._start
        if self._need_preamble:
            head = bytes(buf[start : start + len(MAGIC)])
            if not MAGIC.startswith(head):
                # Decide only when more bytes cannot change the answer, so
                # the code is the same however the bytes are split.
                if not self._eof and _http_undecided(head):
                    return None
                code = classify_bad_preamble(head)
                raise RemoteProtocolError(_BAD_PREAMBLE_TEXT[code], code=code)
            if len(buf) - start < PREAMBLE.size:
                self._need_more("preamble")
                return None
            _, version = PREAMBLE.unpack_from(buf, start)
            self._start += PREAMBLE.size
            self._need_preamble = False
            return Preamble(version)
        if len(buf) - start < HEADER.size:
            self._need_more("frame header")
            return None
        length, kind = HEADER.unpack_from(buf, start)
        if length > self.max_payload:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.max_payload}",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        if kind not in _KINDS:
            raise RemoteProtocolError(f"unknown frame kind {kind}", code=ErrorCode.UNKNOWN_KIND)
        end = start + HEADER.size + length
        if len(buf) < end:
            self._need_more("frame payload")
            return None
        payload = bytes(buf[start + HEADER.size : end])
        self._start = end
        return Frame(FrameKind(kind), payload)

    def _need_more(self, what: str) -> None:  # returns None: "need more bytes"
        if self._eof and self.buffered:
            raise RemoteProtocolError(
                f"connection closed in the middle of a {what}",
                code=ErrorCode.TRUNCATED,
            )
        if self._eof and self._need_preamble:
            raise RemoteProtocolError("connection closed before the preamble", code=ErrorCode.TRUNCATED)
        return None

    @property
    def at_eof(self) -> bool:
        """True once end of file was received and every event was returned."""
        return self._eof and not self.buffered

"""The sans-io frame codec: preamble, frames, chunking, and malformed input."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loupelive.errors import ErrorCode, RemoteProtocolError
from loupelive.wire import (
    HEADER,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    PREAMBLE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameKind,
    Preamble,
    classify_bad_preamble,
    encode_frame,
    encode_preamble,
)

Event = Preamble | Frame

#: A TLS 1.2 ClientHello record header and the start of its handshake message.
TLS_CLIENT_HELLO = bytes.fromhex("16 03 01 02 00 01 00 01 fc 03 03") + bytes(32)

FRAMES = [
    Frame(FrameKind.HELLO, b'{"role":"agent_control"}'),
    Frame(FrameKind.HEARTBEAT, b""),
    Frame(FrameKind.BATCH, bytes(range(256)) * 3),
    Frame(FrameKind.STREAM_END, '{"reason":"fin ✓"}'.encode()),
    Frame(FrameKind.GAP, b"\x00"),
]


def drain(decoder: FrameDecoder) -> list[Event]:
    """Every event the decoder can return now."""
    events: list[Event] = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def decode_chunks(
    chunks: Iterable[bytes | bytearray | memoryview],
    *,
    max_payload: int = MAX_DATA_PAYLOAD,
    expect_preamble: bool = True,
) -> list[Event]:
    """Feed ``chunks`` then end of file, pulling events after every chunk.

    Empty chunks are skipped: ``receive_data(b"")`` means end of file.
    """
    decoder = FrameDecoder(max_payload=max_payload, expect_preamble=expect_preamble)
    events: list[Event] = []
    for chunk in chunks:
        if chunk:
            decoder.receive_data(chunk)
        events += drain(decoder)
    decoder.receive_data(b"")
    events += drain(decoder)
    assert decoder.at_eof
    assert decoder.buffered == 0
    return events


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def stream_of(frames: Iterable[Frame], version: int = PROTOCOL_VERSION) -> bytes:
    return encode_preamble(version) + b"".join(encode_frame(f.kind, f.payload) for f in frames)


def error_code(data: bytes, *, eof: bool, max_payload: int = MAX_DATA_PAYLOAD) -> ErrorCode:
    """Feed ``data`` in one piece (and EOF if asked) and return the error code raised."""
    decoder = FrameDecoder(max_payload=max_payload)
    if data:
        decoder.receive_data(data)
    if eof:
        decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        drain(decoder)
    return info.value.code


def error_code_byte_by_byte(data: bytes) -> ErrorCode | None:
    """Feed ``data`` one byte at a time; the code of the first error, if any."""
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    for byte in byte_by_byte(data):
        decoder.receive_data(byte)
        try:
            drain(decoder)
        except RemoteProtocolError as exc:
            return exc.code
    return None


# -- encoding and round trips ------------------------------------------------------


def test_preamble_layout() -> None:
    assert len(MAGIC) == 8
    assert PREAMBLE.size == 10
    assert encode_preamble() == MAGIC + struct.pack(">H", PROTOCOL_VERSION)
    assert encode_preamble(0x1234) == MAGIC + b"\x12\x34"


def test_frame_layout() -> None:
    assert HEADER.size == 5
    assert encode_frame(FrameKind.HEARTBEAT) == b"\x00\x00\x00\x00\x05"
    assert encode_frame(FrameKind.BATCH, b"abc") == b"\x00\x00\x00\x03\x1eabc"


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.kind.name)
def test_frame_round_trip(frame: Frame) -> None:
    data = encode_frame(frame.kind, frame.payload)
    assert decode_chunks([data], expect_preamble=False) == [frame]
    # ... and the decoded frame encodes back to the same bytes.
    assert encode_frame(frame.kind, frame.payload) == data


@pytest.mark.parametrize("kind", list(FrameKind), ids=lambda k: k.name)
def test_every_kind_round_trips(kind: FrameKind) -> None:
    assert decode_chunks([encode_frame(kind, b"{}")], expect_preamble=False) == [Frame(kind, b"{}")]


@pytest.mark.parametrize("version", [0, 1, 2, 0xFFFF])
def test_preamble_round_trip(version: int) -> None:
    # The codec reports the version; refusing it is the relay's job.
    assert decode_chunks([encode_preamble(version)]) == [Preamble(version)]


def test_payload_of_exactly_max_payload_is_accepted() -> None:
    frame = Frame(FrameKind.BATCH, b"x" * 100)
    assert decode_chunks(
        [encode_frame(frame.kind, frame.payload)], max_payload=100, expect_preamble=False
    ) == [frame]


def test_limits() -> None:
    assert MAX_CONTROL_PAYLOAD == 256 * 1024
    assert MAX_DATA_PAYLOAD == 1024 * 1024


# -- chunking: every offset -----------------------------------------------------------


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.kind.name)
def test_frame_split_at_every_offset(frame: Frame) -> None:
    data = encode_frame(frame.kind, frame.payload)
    assert decode_chunks(byte_by_byte(data), expect_preamble=False) == [frame]
    for cut in range(len(data) + 1):
        assert decode_chunks([data[:cut], data[cut:]], expect_preamble=False) == [frame], cut


def test_stream_split_at_every_offset() -> None:
    data = stream_of(FRAMES)
    expected: list[Event] = [Preamble(PROTOCOL_VERSION), *FRAMES]
    assert decode_chunks([data]) == expected
    assert decode_chunks(byte_by_byte(data)) == expected
    for cut in range(len(data) + 1):
        assert decode_chunks([data[:cut], data[cut:]]) == expected, cut


def test_partial_input_returns_none_and_counts_buffered_bytes() -> None:
    data = stream_of([FRAMES[0]])
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    decoder.receive_data(data[:5])
    assert decoder.next_event() is None
    assert decoder.buffered == 5
    decoder.receive_data(data[5:-1])
    assert decoder.next_event() == Preamble(PROTOCOL_VERSION)
    assert decoder.next_event() is None
    assert decoder.buffered == len(data) - PREAMBLE.size - 1
    assert not decoder.at_eof
    decoder.receive_data(data[-1:])
    assert decoder.next_event() == FRAMES[0]
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk_then_split_frames() -> None:
    # Exercises the consumed-prefix compaction of the receive buffer.
    small = [Frame(FrameKind.HEARTBEAT, bytes([i])) for i in range(200)]
    tail = Frame(FrameKind.BATCH, b"t" * 1000)
    tail_bytes = encode_frame(tail.kind, tail.payload)
    chunks = [stream_of(small) + tail_bytes[:3], tail_bytes[3:500], tail_bytes[500:]]
    assert decode_chunks(chunks) == [Preamble(PROTOCOL_VERSION), *small, tail]


def test_memoryview_and_bytearray_input() -> None:
    data = stream_of(FRAMES[:2])
    assert decode_chunks([memoryview(data)[:7], bytearray(data[7:])]) == [
        Preamble(PROTOCOL_VERSION),
        *FRAMES[:2],
    ]


# -- end of file ----------------------------------------------------------------------


def test_clean_eof_after_complete_frames() -> None:
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    decoder.receive_data(stream_of(FRAMES))
    decoder.receive_data(b"")
    assert not decoder.at_eof  # events are still buffered
    assert drain(decoder) == [Preamble(PROTOCOL_VERSION), *FRAMES]
    assert decoder.at_eof
    assert decoder.next_event() is None
    assert decoder.next_event() is None


def test_clean_eof_right_after_preamble() -> None:
    assert decode_chunks([encode_preamble()]) == [Preamble(PROTOCOL_VERSION)]


def test_receive_data_after_eof_is_a_caller_bug() -> None:
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"x")


# -- malformed input --------------------------------------------------------------


def header(length: int, kind: int) -> bytes:
    return HEADER.pack(length, kind)


PREAMBLE_ERRORS = [
    pytest.param(b"\x00" * 10, ErrorCode.BAD_MAGIC, id="zeros"),
    pytest.param(b"\x8bLOUPX\r\n\x00\x01", ErrorCode.BAD_MAGIC, id="magic-typo"),
    pytest.param(b"\x8bLOUPE\n\x00\x01\x00", ErrorCode.BAD_MAGIC, id="crlf-translated"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", ErrorCode.BAD_MAGIC, id="ssh"),
    pytest.param(TLS_CLIENT_HELLO, ErrorCode.TLS_ON_PLAINTEXT, id="tls-client-hello"),
    pytest.param(b"\x16", ErrorCode.TLS_ON_PLAINTEXT, id="tls-first-byte"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.HTTP_REQUEST, id="http-get"),
    pytest.param(b"get / HTTP/1.1\r\n", ErrorCode.HTTP_REQUEST, id="http-get-lowercase"),
    pytest.param(b"POST /x HTTP/1.1\r\n", ErrorCode.HTTP_REQUEST, id="http-post"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\n", ErrorCode.HTTP_REQUEST, id="http-options"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ErrorCode.HTTP_REQUEST, id="http2-preface"),
    pytest.param(b"PING\r\n", ErrorCode.BAD_MAGIC, id="looks-like-a-method-then-is-not"),
]

#: Prefixes of an HTTP method: undecided until more bytes or end of file.
PARTIAL_HTTP = [pytest.param(b"GE", id="partial-get"), pytest.param(b"DELE", id="partial-delete")]


@pytest.mark.parametrize("data", PARTIAL_HTTP)
def test_partial_http_method_waits_for_more_bytes(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    decoder.receive_data(data)
    assert decoder.next_event() is None
    assert error_code(data, eof=True) == ErrorCode.HTTP_REQUEST
    assert error_code_byte_by_byte(data) is None


@pytest.mark.parametrize(("data", "code"), PREAMBLE_ERRORS)
def test_bad_preamble(data: bytes, code: ErrorCode) -> None:
    # Detected without waiting for more bytes or for end of file ...
    assert error_code(data, eof=False) == code
    assert error_code(data, eof=True) == code
    assert classify_bad_preamble(data[: len(MAGIC)]) == code


@pytest.mark.parametrize(("data", "code"), PREAMBLE_ERRORS)
def test_bad_preamble_byte_by_byte(data: bytes, code: ErrorCode) -> None:
    # ... and with the same code however the bytes arrive.
    assert error_code_byte_by_byte(data) == code


TRUNCATIONS = [
    pytest.param(b"", id="before-preamble"),
    pytest.param(MAGIC[:1], id="first-magic-byte"),
    pytest.param(MAGIC, id="magic-without-version"),
    pytest.param(encode_preamble()[:-1], id="mid-version"),
    pytest.param(encode_preamble() + header(3, FrameKind.GAP)[:1], id="mid-header-1"),
    pytest.param(encode_preamble() + header(3, FrameKind.GAP)[:4], id="mid-header-4"),
    pytest.param(encode_preamble() + header(3, FrameKind.GAP), id="header-no-payload"),
    pytest.param(encode_preamble() + header(3, FrameKind.GAP) + b"ab", id="mid-payload"),
    pytest.param(stream_of(FRAMES) + encode_frame(FrameKind.BATCH, b"xyz")[:-1], id="after-frames"),
]


@pytest.mark.parametrize("data", TRUNCATIONS)
def test_truncated_at_eof(data: bytes) -> None:
    assert error_code(data, eof=True) == ErrorCode.TRUNCATED


@pytest.mark.parametrize("data", TRUNCATIONS)
def test_truncation_is_not_an_error_before_eof(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    if data:
        decoder.receive_data(data)
    drain(decoder)
    assert not decoder.at_eof


@pytest.mark.parametrize("cut", range(1, PREAMBLE.size))
def test_preamble_truncated_at_every_offset(cut: int) -> None:
    assert error_code(encode_preamble()[:cut], eof=True) == ErrorCode.TRUNCATED


FRAME_ERRORS = [
    pytest.param(header(101, FrameKind.BATCH), ErrorCode.FRAME_TOO_LARGE, id="too-large-by-one"),
    pytest.param(header(2**32 - 1, FrameKind.HELLO), ErrorCode.FRAME_TOO_LARGE, id="too-large-u32-max"),
    pytest.param(header(2**32 - 1, 0), ErrorCode.FRAME_TOO_LARGE, id="too-large-beats-unknown-kind"),
    pytest.param(header(0, 0), ErrorCode.UNKNOWN_KIND, id="kind-0"),
    pytest.param(header(0, 6), ErrorCode.UNKNOWN_KIND, id="kind-6"),
    pytest.param(header(4, 33), ErrorCode.UNKNOWN_KIND, id="kind-33"),
    pytest.param(header(4, 17), ErrorCode.UNKNOWN_KIND, id="kind-17"),
    pytest.param(header(4, 255), ErrorCode.UNKNOWN_KIND, id="kind-255"),
]


@pytest.mark.parametrize(("head", "code"), FRAME_ERRORS)
def test_bad_frame_header_fails_before_the_payload(head: bytes, code: ErrorCode) -> None:
    decoder = FrameDecoder(max_payload=100)
    decoder.receive_data(encode_preamble())
    assert decoder.next_event() == Preamble(PROTOCOL_VERSION)
    for byte in byte_by_byte(head[:-1]):
        decoder.receive_data(byte)
        assert decoder.next_event() is None
    # The last header byte is enough: no payload byte has arrived.
    decoder.receive_data(head[-1:])
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code == code


@pytest.mark.parametrize(("head", "code"), FRAME_ERRORS)
def test_bad_frame_header_after_good_frames(head: bytes, code: ErrorCode) -> None:
    decoder = FrameDecoder(max_payload=100, expect_preamble=False)
    good = [Frame(FrameKind.HEARTBEAT, b""), Frame(FrameKind.GAP, b"{}")]
    decoder.receive_data(b"".join(encode_frame(f.kind, f.payload) for f in good) + head)
    assert decoder.next_event() == good[0]
    assert decoder.next_event() == good[1]
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code == code


def test_frame_too_large_uses_the_decoders_limit() -> None:
    data = encode_preamble() + header(MAX_CONTROL_PAYLOAD + 1, FrameKind.HELLO)
    assert error_code(data, eof=False, max_payload=MAX_CONTROL_PAYLOAD) == ErrorCode.FRAME_TOO_LARGE
    decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
    decoder.receive_data(data)
    assert decoder.next_event() == Preamble(PROTOCOL_VERSION)
    assert decoder.next_event() is None  # within the data limit: waits for the payload


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\n", id="bad-preamble"),
        pytest.param(encode_preamble() + header(0, 99), id="unknown-kind"),
        pytest.param(encode_preamble() + header(10**6, FrameKind.BATCH), id="too-large"),
    ],
)
def test_decoder_stays_failed(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=100)
    decoder.receive_data(data)
    with pytest.raises(RemoteProtocolError) as first:
        drain(decoder)
    # Valid bytes afterwards do not revive it, nor does end of file.
    decoder.receive_data(encode_frame(FrameKind.HEARTBEAT))
    with pytest.raises(RemoteProtocolError) as second:
        decoder.next_event()
    assert second.value is first.value
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as third:
        decoder.next_event()
    assert third.value.code == first.value.code


def test_truncation_error_is_sticky() -> None:
    decoder = FrameDecoder(max_payload=100)
    decoder.receive_data(encode_preamble()[:4])
    decoder.receive_data(b"")
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as info:
            decoder.next_event()
        assert info.value.code == ErrorCode.TRUNCATED


# -- properties ----------------------------------------------------------------------

frames_strategy = st.lists(
    st.builds(Frame, st.sampled_from(list(FrameKind)), st.binary(max_size=300)),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames_strategy, data=st.data())
def test_random_chunking_gives_the_same_events(frames: list[Frame], data: st.DataObject) -> None:
    stream = stream_of(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode_chunks(chunks) == [Preamble(PROTOCOL_VERSION), *frames]


@settings(max_examples=300, deadline=None)
@given(frames=frames_strategy, cut=st.integers(min_value=1))
def test_random_truncation_is_reported_at_eof(frames: list[Frame], cut: int) -> None:
    stream = stream_of([*frames, Frame(FrameKind.BATCH, b"last")])
    cut = cut % len(stream)  # strictly inside the stream, never at a frame's end
    boundaries = {PREAMBLE.size}
    for frame in frames:
        boundaries.add(max(boundaries) + HEADER.size + len(frame.payload))
    if cut in boundaries:
        cut -= 1
    assert error_code(stream[:cut], eof=True) == ErrorCode.TRUNCATED

"""Records, their binary encoding, and the compressed batch stream."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loupelive.errors import ErrorCode, LocalProtocolError, StreamDecodeError
from loupelive.records import (
    HISTORY,
    HISTORY_END,
    MAX_BATCH_HEADER,
    MAX_RAW_BATCH,
    MAX_TEXT,
    STRING_TABLE_MAX,
    SYNC,
    BatchDecoder,
    BatchEncoder,
    BatchHeader,
    Level,
    Record,
    RecordEncoder,
    brotli_window_bits,
)

U64 = 2**64 - 1


def rec(seq: int, **changes: object) -> Record:
    base: dict[str, object] = {
        "timestamp": 1_700_000_000.0 + seq / 1000,
        "level": Level.INFO,
        "logger": "app.web",
        "thread": "MainThread",
        "message": f"request {seq} done",
    }
    base.update(changes)
    return Record(seq=seq, **base)  # type: ignore[arg-type]


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def make_batch(
    raw: bytes,
    *,
    count: int,
    first_seq: int = 1,
    last_seq: int | None = None,
    flags: int = SYNC,
    raw_len: int | None = None,
    lgwin: int = 18,
) -> bytes:
    """A BATCH payload carrying ``raw`` record bytes, compressed in a fresh context."""
    compressor = brotli.Compressor(lgwin=lgwin)
    compressed = compressor.process(raw) + compressor.flush()
    header = BatchHeader(
        flags=flags,
        viewer=0,
        first_seq=first_seq,
        last_seq=first_seq + count - 1 if last_seq is None else last_seq,
        count=count,
        raw_len=len(raw) if raw_len is None else raw_len,
    )
    return header.pack() + compressed


def encode_one(records: Sequence[Record], *, first_seq: int | None = None) -> bytes:
    first = records[0].seq if first_seq is None else first_seq
    last = records[-1].seq if records else first - 1
    return BatchEncoder().encode(records, first_seq=first, last_seq=last)


def round_trip(records: Sequence[Record], *, first_seq: int | None = None) -> list[Record]:
    header, decoded = BatchDecoder().decode(encode_one(records, first_seq=first_seq))
    assert header.count == len(records)
    return decoded


# -- levels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("debug", Level.DEBUG),
        ("INFO", Level.INFO),
        (" Warning ", Level.WARNING),
        ("warn", Level.WARNING),
        ("WARN", Level.WARNING),
        ("error", Level.ERROR),
        ("critical", Level.CRITICAL),
        ("fatal", Level.CRITICAL),
        ("20", Level.INFO),
        ("25", Level.INFO),
        ("5", Level.DEBUG),
        (30, Level.WARNING),
        (25, Level.INFO),
        (5, Level.DEBUG),
        (0, Level.DEBUG),
        (100, Level.CRITICAL),
    ],
)
def test_level_parse(text: str | int, level: Level) -> None:
    assert Level.parse(text) is level


@pytest.mark.parametrize("text", ["", "verbose", "warning!", "-5", "2.5", "in fo", "notset"])
def test_level_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a log level"):
        Level.parse(text)


@pytest.mark.parametrize(
    ("number", "level"),
    [
        (-1, Level.DEBUG),
        (5, Level.DEBUG),
        (10, Level.DEBUG),
        (19, Level.DEBUG),
        (25, Level.INFO),
        (35, Level.WARNING),
        (49, Level.ERROR),
        (50, Level.CRITICAL),
        (255, Level.CRITICAL),
    ],
)
def test_level_from_number(number: int, level: Level) -> None:
    assert Level.from_number(number) is level


# -- the record model -----------------------------------------------------------------


def test_record_normalises_its_fields() -> None:
    record = Record(seq=1, timestamp=1.23456789, level=25, fields={"n": 1, "ok": True})  # type: ignore[dict-item]
    assert record.timestamp == 1.234568
    assert record.level is Level.INFO
    assert record.fields == {"n": "1", "ok": "True"}
    assert record.to_json() == {
        "seq": 1,
        "timestamp": 1.234568,
        "level": "INFO",
        "logger": "",
        "thread": "",
        "message": "",
        "exception": None,
        "fields": {"n": "1", "ok": "True"},
        "file": "",
        "line": 0,
        "function": "",
        "module": "",
        "process": 0,
        "thread_id": 0,
    }


# -- the batch header -----------------------------------------------------------------


def header_bytes(
    flags: int = SYNC, first: int = 1, last: int = 3, count: int = 3, raw_len: int = 10, viewer: int = 7
) -> bytes:
    """A header written by hand (also the invalid ones ``BatchHeader`` would refuse)."""
    view = varint(viewer) if flags & HISTORY else b""
    return bytes((flags,)) + view + varint(first) + varint(last - first + 1) + varint(count) + varint(raw_len)


def test_batch_header_layout() -> None:
    # flags, first_seq, span, count, raw_len: a one-record live batch is small.
    live = BatchHeader(flags=0, viewer=0, first_seq=1000, last_seq=1000, count=1, raw_len=90)
    assert live.pack() == bytes((0,)) + varint(1000) + varint(1) + varint(1) + varint(90)
    assert len(live.pack()) == 6
    history = BatchHeader(flags=SYNC | HISTORY, viewer=3, first_seq=1, last_seq=0, count=0, raw_len=0)
    assert history.pack() == bytes((SYNC | HISTORY, 3, 1, 0, 0, 0))
    assert (
        len(BatchHeader(flags=7, viewer=U64, first_seq=U64, last_seq=U64, count=U64, raw_len=U64).pack())
        <= MAX_BATCH_HEADER
    )


def test_batch_header_round_trip() -> None:
    header = BatchHeader(
        flags=SYNC | HISTORY | HISTORY_END,
        viewer=2**32 - 1,
        first_seq=1,
        last_seq=U64,
        count=2**32 - 1,
        raw_len=MAX_RAW_BATCH,
    )
    assert BatchHeader.unpack(header.pack()) == header
    assert BatchHeader.unpack(header.pack() + b"brotli bytes") == header
    assert (header.sync, header.history, header.history_end) == (True, True, True)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(header_bytes(first=5, last=4, count=0), id="empty-range"),
        pytest.param(header_bytes(count=0), id="fewer-records-than-range"),
        pytest.param(header_bytes(flags=0), id="live"),
        pytest.param(header_bytes(flags=SYNC | HISTORY), id="history"),
        pytest.param(header_bytes(raw_len=MAX_RAW_BATCH), id="largest-raw-len"),
    ],
)
def test_batch_header_accepts(payload: bytes) -> None:
    header, size = BatchHeader.parse(payload)
    assert size == len(payload)
    assert header.pack() == payload


BAD_HEADERS = [
    pytest.param(b"", id="empty"),
    pytest.param(header_bytes()[:-1], id="short"),
    pytest.param(header_bytes(flags=0x08), id="unknown-flag-0x08"),
    pytest.param(header_bytes(flags=0x80 | SYNC), id="unknown-flag-0x80"),
    pytest.param(header_bytes(flags=HISTORY), id="history-without-sync"),
    pytest.param(header_bytes(flags=HISTORY | HISTORY_END), id="history-end-without-sync"),
    pytest.param(header_bytes(flags=SYNC | HISTORY_END), id="history-end-without-history"),
    pytest.param(header_bytes(first=0, last=3, count=1), id="first-seq-zero"),
    pytest.param(bytes((SYNC,)) + varint(U64) + varint(2) + varint(0) + varint(0), id="range-past-u64"),
    pytest.param(
        bytes((SYNC,)) + b"\xff" * 11 + b"\x01" + varint(1) + varint(0) + varint(0), id="varint-too-long"
    ),
    pytest.param(header_bytes(first=1, last=3, count=4), id="count-above-range"),
    pytest.param(header_bytes(first=5, last=4, count=1), id="count-in-empty-range"),
    pytest.param(header_bytes(raw_len=MAX_RAW_BATCH + 1), id="raw-len-too-large"),
]


@pytest.mark.parametrize("payload", BAD_HEADERS)
def test_batch_header_rejects(payload: bytes) -> None:
    with pytest.raises(StreamDecodeError) as info:
        BatchHeader.unpack(payload)
    assert info.value.code == ErrorCode.BAD_STREAM


@pytest.mark.parametrize("payload", BAD_HEADERS)
def test_batch_decoder_rejects_bad_headers(payload: bytes) -> None:
    with pytest.raises(StreamDecodeError):
        BatchDecoder().decode(payload)


# -- record round trips ---------------------------------------------------------------

RECORD_CASES = [
    pytest.param([Record(seq=1, timestamp=0, level=Level.DEBUG)], id="all-empty"),
    pytest.param(
        [rec(1, exception="Traceback (most recent call last):\n  ...\nValueError: x")], id="exception"
    ),
    pytest.param([rec(1, exception="")], id="empty-exception"),
    pytest.param([rec(1, fields={"user": "ana", "latency_ms": "12", "": ""})], id="fields"),
    pytest.param(
        [rec(1, exception="boom", fields={"a": "b"}), rec(2), rec(3, fields={"a": "c"})], id="mixed-flags"
    ),
    pytest.param(
        [
            rec(
                1,
                logger="ünïcødé.日本",
                thread="スレッド",
                message="😀 \u200f עברית \x00 nul\r\n",
                fields={"κ": "ν"},
            )
        ],
        id="unicode",
    ),
    pytest.param([rec(1, message="lone \ud800 surrogate", logger="\udfff")], id="lone-surrogates"),
    pytest.param([rec(1, logger="", thread="", message="", fields={"": ""})], id="empty-strings"),
    pytest.param([rec(s, timestamp=1.5) for s in (2**63, 2**64 - 2, U64)], id="large-seqs"),
    pytest.param([rec(1), rec(7), rec(1_000_000)], id="seq-jumps"),
    pytest.param(
        [rec(1, timestamp=1_700_000_000.5), rec(2, timestamp=1_600_000_000.25), rec(3, timestamp=0.000001)],
        id="negative-timestamp-deltas",
    ),
    pytest.param([rec(1, timestamp=-86_400.123456), rec(2, timestamp=-1e-6)], id="before-epoch"),
    pytest.param([rec(i, level=level) for i, level in enumerate(Level, start=1)], id="every-level"),
    pytest.param(
        [rec(i, logger="same", thread="same", fields={"k": "same"}) for i in range(1, 50)],
        id="repeated-strings",
    ),
    pytest.param(
        [rec(i, logger="L" * 500, fields={"k" * 300: "v" * 300}) for i in range(1, 4)], id="long-strings"
    ),
]


@pytest.mark.parametrize("records", RECORD_CASES)
def test_record_round_trip(records: list[Record]) -> None:
    assert round_trip(records) == records


def test_first_record_may_start_after_first_seq() -> None:
    # The batch covers 10..20; only seqs 15 and 20 passed the level filter.
    records = [rec(15), rec(20)]
    payload = BatchEncoder().encode(records, first_seq=10, last_seq=20)
    header, decoded = BatchDecoder().decode(payload)
    assert (header.first_seq, header.last_seq, header.count) == (10, 20, 2)
    assert decoded == records


def test_empty_batch_round_trip() -> None:
    header, decoded = BatchDecoder().decode(BatchEncoder().encode([], first_seq=5, last_seq=4))
    assert decoded == []
    assert (header.first_seq, header.last_seq, header.count, header.raw_len) == (5, 4, 0, 0)


def test_string_table_full_still_round_trips() -> None:
    records = [
        rec(i, logger=f"logger-{i}", fields={f"key-{i}": "v"}) for i in range(1, STRING_TABLE_MAX + 500)
    ]
    encoder, decoder = BatchEncoder(), BatchDecoder()
    for batch in (records[:3000], records[3000:]):
        payload = encoder.encode(batch, first_seq=batch[0].seq, last_seq=batch[-1].seq)
        assert decoder.decode(payload)[1] == batch
    # The same names again, after the table filled up: some refs, some literals.
    again = [rec(r.seq + len(records), logger=r.logger, fields=r.fields) for r in records[-10:]]
    payload = encoder.encode(again, first_seq=again[0].seq, last_seq=again[-1].seq)
    assert decoder.decode(payload)[1] == again


def test_large_batch_round_trip() -> None:
    # Several MiB in one context: the decompressor hands output back in pieces.
    records = [rec(i, message=f"{i:08d} " + "lorem ipsum " * 100) for i in range(1, 2401)]
    encoder, decoder = BatchEncoder(), BatchDecoder()
    for start in range(0, len(records), 800):
        batch = records[start : start + 800]
        header, decoded = decoder.decode(
            encoder.encode(batch, first_seq=batch[0].seq, last_seq=batch[-1].seq)
        )
        assert header.raw_len > 900_000
        assert decoded == batch


def test_long_text_is_cut_and_marked() -> None:
    record = rec(1, message="m" * (MAX_TEXT + 10), exception="e" * (MAX_TEXT + 1))
    [decoded] = round_trip([record])
    assert decoded.message == "m" * MAX_TEXT + "… [loupelive: 10 bytes cut]"
    assert decoded.exception == "e" * MAX_TEXT + "… [loupelive: 1 bytes cut]"


def test_one_record_of_the_longest_text_fits_in_a_batch() -> None:
    # MAX_TEXT promises "one record always fits in a batch", whatever the text.
    record = rec(1, message="😀" * (MAX_TEXT + 1))
    payload = encode_one([record])
    assert BatchHeader.unpack(payload).raw_len <= MAX_RAW_BATCH
    [decoded] = BatchDecoder().decode(payload)[1]
    assert decoded.message.startswith("😀" * 1000)


@pytest.mark.parametrize(
    "seqs",
    [
        pytest.param([1, 1], id="repeated"),
        pytest.param([2, 1], id="decreasing"),
        pytest.param([0], id="below-first"),
    ],
)
def test_encoder_refuses_non_increasing_seqs(seqs: list[int]) -> None:
    with pytest.raises(LocalProtocolError):
        BatchEncoder().encode([rec(s) for s in seqs], first_seq=1, last_seq=5)


@pytest.mark.parametrize("quality", [0, 1, 12])
def test_encoder_refuses_bad_quality(quality: int) -> None:
    with pytest.raises(ValueError, match="quality"):
        BatchEncoder(quality=quality)


@pytest.mark.parametrize("quality", [2, 11])
def test_encoder_quality_bounds(quality: int) -> None:
    payload = BatchEncoder(quality=quality).encode([rec(1)], first_seq=1, last_seq=1)
    assert BatchDecoder().decode(payload)[1] == [rec(1)]


# -- one context across batches, sync points, history ---------------------------------


def live_stream() -> tuple[list[list[Record]], list[bytes]]:
    """Four live batches from one encoder; the third is a sync point."""
    batches = [[rec(i) for i in range(n, n + 5)] for n in (1, 6, 11, 16)]
    encoder = BatchEncoder()
    payloads = [
        encoder.encode(batch, first_seq=batch[0].seq, last_seq=batch[-1].seq, sync=index == 2)
        for index, batch in enumerate(batches)
    ]
    return batches, payloads


def test_batches_share_one_context() -> None:
    batches, payloads = live_stream()
    decoder = BatchDecoder()
    syncs = []
    for batch, payload in zip(batches, payloads, strict=True):
        header, records = decoder.decode(payload)
        assert records == batch
        syncs.append(header.sync)
    assert syncs == [True, False, True, False]
    # The second batch reuses the first one's strings and compression context.
    assert len(payloads[1]) < len(payloads[0])


def test_decoding_can_start_at_a_sync_point() -> None:
    batches, payloads = live_stream()
    decoder = BatchDecoder()
    assert decoder.decode(payloads[2])[1] == batches[2]
    assert decoder.decode(payloads[3])[1] == batches[3]


@pytest.mark.parametrize("index", [1, 3])
def test_decoding_cannot_start_between_sync_points(index: int) -> None:
    _, payloads = live_stream()
    with pytest.raises(StreamDecodeError, match="sync point"):
        BatchDecoder().decode(payloads[index])


def test_sync_point_resets_string_table_and_timestamps() -> None:
    encoder = BatchEncoder()
    first = [rec(1, logger="shared", timestamp=5_000.0)]
    second = [rec(2, logger="shared", timestamp=4_000.0)]
    encoder.encode(first, first_seq=1, last_seq=1)
    payload = encoder.encode(second, first_seq=2, last_seq=2, sync=True)
    # A decoder that never saw the first batch needs nothing from it.
    assert BatchDecoder().decode(payload)[1] == second


def test_history_batches() -> None:
    held = [rec(i, logger="hist") for i in range(1, 8)]
    encoder = BatchEncoder()
    parts = [
        encoder.encode_history(held[:4], viewer=9, first_seq=1, last_seq=4, end=False),
        encoder.encode_history(held[4:], viewer=9, first_seq=5, last_seq=7, end=True),
    ]
    decoder = BatchDecoder()
    header, records = decoder.decode(parts[0])
    assert records == held[:4]
    assert (header.sync, header.history, header.history_end, header.viewer) == (True, True, False, 9)
    header, records = decoder.decode(parts[1])
    assert records == held[4:]
    assert (header.sync, header.history, header.history_end, header.viewer) == (True, True, True, 9)
    # Each history batch is self-contained.
    assert BatchDecoder().decode(parts[1])[1] == held[4:]


def test_empty_history() -> None:
    payload = BatchEncoder().encode_history([], viewer=3, first_seq=11, last_seq=10, end=True)
    header, records = BatchDecoder().decode(payload)
    assert records == []
    assert header.history_end
    assert (header.first_seq, header.last_seq, header.count) == (11, 10, 0)


def test_history_does_not_disturb_the_live_context() -> None:
    encoder = BatchEncoder()
    live1, live2 = [rec(1), rec(2)], [rec(3), rec(4)]
    p1 = encoder.encode(live1, first_seq=1, last_seq=2)
    history = encoder.encode_history(live1, viewer=5, first_seq=1, last_seq=2, end=True)
    p2 = encoder.encode(live2, first_seq=3, last_seq=4)
    assert not BatchHeader.unpack(p2).sync
    live_viewer = BatchDecoder()
    assert live_viewer.decode(p1)[1] == live1
    assert live_viewer.decode(p2)[1] == live2
    # The joining viewer gets history, then waits for the next live sync point.
    joining = BatchDecoder()
    assert joining.decode(history)[1] == live1
    with pytest.raises(StreamDecodeError, match="sync point"):
        joining.decode(p2)
    p3 = encoder.encode([rec(5)], first_seq=5, last_seq=5, sync=True)
    assert joining.decode(p3)[1] == [rec(5)]


# -- malformed compressed data ---------------------------------------------------------


def test_decompression_bomb_is_stopped_at_the_announced_size() -> None:
    compressor = brotli.Compressor(lgwin=18, quality=5)
    zeros = bytes(1024 * 1024)
    bomb = b"".join(compressor.process(zeros) for _ in range(50)) + compressor.flush()
    header = BatchHeader(flags=SYNC, viewer=0, first_seq=1, last_seq=1, count=1, raw_len=100)
    payload = header.pack() + bomb
    assert len(payload) < 10_000
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with pytest.raises(StreamDecodeError, match="inflates past"):
            BatchDecoder().decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_decompression_is_capped_by_max_raw() -> None:
    compressor = brotli.Compressor(lgwin=18, quality=5)
    bomb = b"".join(compressor.process(bytes(1024 * 1024)) for _ in range(8)) + compressor.flush()
    header = BatchHeader(flags=SYNC, viewer=0, first_seq=1, last_seq=1, count=1, raw_len=MAX_RAW_BATCH)
    with pytest.raises(StreamDecodeError, match="inflates past"):
        BatchDecoder(max_raw=64 * 1024).decode(header.pack() + bomb)


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_raw_len_must_match(delta: int) -> None:
    raw = RecordEncoder().encode([rec(1)], 1)
    with pytest.raises(StreamDecodeError):
        BatchDecoder().decode(make_batch(raw, count=1, raw_len=len(raw) + delta))


@pytest.mark.parametrize("lgwin", range(10, 25))
def test_brotli_window_bits(lgwin: int) -> None:
    compressor = brotli.Compressor(lgwin=lgwin)
    assert brotli_window_bits(compressor.process(b"some log text") + compressor.flush()) == lgwin
    assert brotli_window_bits(brotli.compress(b"x" * 1000, lgwin=lgwin)) == lgwin


def test_brotli_window_bits_unknown() -> None:
    assert brotli_window_bits(b"") is None
    assert brotli_window_bits(b"\x11") is None  # the large-window extension


@pytest.mark.parametrize("lgwin", [10, 16, 17, 18])
def test_small_windows_are_accepted(lgwin: int) -> None:
    raw = RecordEncoder().encode([rec(1), rec(2)], 1)
    assert BatchDecoder().decode(make_batch(raw, count=2, lgwin=lgwin))[1] == [rec(1), rec(2)]


@pytest.mark.parametrize("lgwin", [19, 22, 24])
def test_large_windows_are_refused(lgwin: int) -> None:
    raw = RecordEncoder().encode([rec(1), rec(2)], 1)
    with pytest.raises(StreamDecodeError, match="window"):
        BatchDecoder().decode(make_batch(raw, count=2, lgwin=lgwin))


def test_large_window_extension_is_refused() -> None:
    with pytest.raises(StreamDecodeError, match="window"):
        BatchDecoder().decode(header_bytes(count=0, raw_len=0) + b"\x11" + bytes(20))


def valid_payload() -> bytes:
    return BatchEncoder().encode([rec(i) for i in range(1, 20)], first_seq=1, last_seq=19)


def corrupt(payload: bytes, data: bytes) -> bytes:
    return payload[: BatchHeader.parse(payload)[1]] + data


def compressed(payload: bytes) -> bytes:
    return payload[BatchHeader.parse(payload)[1] :]


CORRUPTIONS = [
    pytest.param(lambda d: d[:1] + bytes(40), id="zeros"),
    pytest.param(lambda d: d[:1] + b"\xff" * 40, id="ones"),
    pytest.param(lambda d: d[:1] + bytes(reversed(d[1:])), id="reversed"),
    pytest.param(lambda d: d[:-3] + b"\xff\xff\xff", id="bad-tail"),
    pytest.param(lambda d: d[: len(d) // 2], id="truncated"),
    pytest.param(lambda d: d[:1], id="header-byte-only"),
    pytest.param(lambda d: bytes([d[0]]) + bytes(b ^ 0x55 for b in d[1:]), id="xor"),
]


@pytest.mark.parametrize("mangle", CORRUPTIONS)
def test_corrupted_compressed_bytes(mangle: object) -> None:
    payload = valid_payload()
    bad = corrupt(payload, mangle(compressed(payload)))  # type: ignore[operator]
    with pytest.raises(StreamDecodeError) as info:
        BatchDecoder().decode(bad)
    assert info.value.code == ErrorCode.BAD_STREAM


def test_brotli_errors_are_translated() -> None:
    payload = valid_payload()
    with pytest.raises(StreamDecodeError) as info:
        BatchDecoder().decode(corrupt(payload, compressed(payload)[:1] + bytes(40)))
    assert isinstance(info.value.__cause__, brotli.error)


def test_bytes_after_a_finished_history_stream() -> None:
    payload = BatchEncoder().encode_history([rec(1)], viewer=1, first_seq=1, last_seq=1, end=True)
    with pytest.raises(StreamDecodeError):
        BatchDecoder().decode(payload + b"\x00")


# -- malformed record data ------------------------------------------------------------

#: seq_delta 1, ts_delta 0, level INFO, flags 0, logger literal "", thread literal "", message "".
MINIMAL = b"\x01\x00\x14\x00" + b"\x01\x00" + b"\x01\x00" + b"\x00"


def raw_record(
    *, flags: int = 0, level: int = 20, seq_delta: int = 1, body: bytes = b"\x01\x00\x01\x00\x00"
) -> bytes:
    return varint(seq_delta) + b"\x00" + bytes([level, flags]) + body


def test_minimal_record_decodes() -> None:
    [record] = BatchDecoder().decode(make_batch(MINIMAL, count=1))[1]
    assert record == Record(seq=1, timestamp=0, level=Level.INFO)


@pytest.mark.parametrize(
    ("byte", "level"), [(0, Level.DEBUG), (25, Level.INFO), (45, Level.ERROR), (255, Level.CRITICAL)]
)
def test_custom_level_bytes_map_to_the_level_below(byte: int, level: Level) -> None:
    [record] = BatchDecoder().decode(make_batch(raw_record(level=byte), count=1))[1]
    assert record.level is level


def test_string_references_resolve() -> None:
    # logger: new "a" (entry 0); thread: ref 2 (entry 0 again).
    raw = raw_record(body=b"\x00\x01a" + b"\x02" + b"\x00")
    [record] = BatchDecoder().decode(make_batch(raw, count=1))[1]
    assert (record.logger, record.thread) == ("a", "a")


def new_string(text: str) -> bytes:
    """A strref that adds ``text`` to the string table."""
    data = text.encode()
    return b"\x00" + varint(len(data)) + data


#: Logger, thread and 2048 fields: STRING_TABLE_MAX + 2 new strings in one context.
TABLE_OVERFLOW = raw_record(
    flags=2,
    body=new_string("logger")
    + new_string("thread")
    + b"\x00"
    + varint(STRING_TABLE_MAX // 2)
    + b"".join(new_string(f"k{i}") + new_string(f"v{i}") for i in range(STRING_TABLE_MAX // 2)),
)

BAD_RECORDS = [
    # raw record bytes, header count, header last_seq, expected reason
    pytest.param(MINIMAL[:-1], 1, 1, "inside a number", id="truncated-message-length"),
    pytest.param(MINIMAL[:2], 1, 1, "inside a record", id="truncated-before-level"),
    pytest.param(MINIMAL[:1], 1, 1, "inside a number", id="truncated-in-timestamp"),
    pytest.param(raw_record(body=b"\x01\x00\x01\x00\x05ab"), 1, 1, "runs past", id="truncated-text"),
    pytest.param(raw_record(body=b"\x01\x7f"), 1, 1, "runs past", id="text-past-end"),
    pytest.param(MINIMAL, 2, 2, "inside a number", id="fewer-records-than-count"),
    pytest.param(raw_record(flags=1), 1, 1, "inside a number", id="missing-exception"),
    pytest.param(MINIMAL + b"\x00", 1, 1, "stray bytes", id="stray-byte"),
    pytest.param(MINIMAL + MINIMAL, 1, 2, "stray bytes", id="stray-record"),
    pytest.param(raw_record(body=b"\x02\x01\x00\x00"), 1, 1, "out of range", id="ref-into-empty-table"),
    pytest.param(raw_record(body=b"\x00\x01a\x03\x00"), 1, 1, "out of range", id="ref-past-table-end"),
    pytest.param(raw_record(body=b"\x01\x00" + varint(10**6) + b"\x00"), 1, 1, "out of range", id="huge-ref"),
    pytest.param(TABLE_OVERFLOW, 1, 1, "table overflow", id="string-table-overflow"),
    pytest.param(raw_record(seq_delta=0), 1, 1, "must increase", id="seq-delta-zero"),
    pytest.param(raw_record(seq_delta=2), 1, 1, "beyond the batch range", id="seq-beyond-range"),
    pytest.param(raw_record(flags=16), 1, 1, "unknown record flags", id="unknown-record-flag"),
    pytest.param(raw_record(flags=4), 1, 1, "ends inside a number", id="source-flag-without-source"),
    pytest.param(
        raw_record(flags=4) + b"\x01\x00\x01\x00\x01\x00\x80",
        1,
        1,
        "ends inside a number",
        id="truncated-line-number",
    ),
    pytest.param(raw_record(body=b"\x01\x00\x01\x00\x02\xc3\x28"), 1, 1, "UTF-8", id="invalid-utf8"),
    pytest.param(raw_record(body=b"\x01\x02\xff\xfe\x01\x00\x00"), 1, 1, "UTF-8", id="invalid-utf8-logger"),
    pytest.param(b"\x80" * 10 + b"\x01" + MINIMAL[1:], 1, 1, "number too long", id="varint-too-long"),
    pytest.param(
        raw_record(flags=2, body=b"\x01\x00\x01\x00\x00\x64"), 1, 1, "field count", id="field-count-past-end"
    ),
    pytest.param(
        raw_record(flags=2, body=b"\x01\x00\x01\x00\x00\x01\x01\x00"),
        1,
        1,
        "inside a number",
        id="field-without-value",
    ),
]


@pytest.mark.parametrize(("raw", "count", "last_seq", "reason"), BAD_RECORDS)
def test_malformed_record_data(raw: bytes, count: int, last_seq: int, reason: str) -> None:
    with pytest.raises(StreamDecodeError, match=reason) as info:
        BatchDecoder().decode(make_batch(raw, count=count, last_seq=last_seq))
    assert info.value.code == ErrorCode.BAD_STREAM


def test_string_table_holds_exactly_its_maximum() -> None:
    n = STRING_TABLE_MAX // 2 - 1  # with logger and thread: exactly STRING_TABLE_MAX strings
    fields = b"".join(new_string(f"k{i}") + new_string(f"v{i}") for i in range(n))
    raw = raw_record(flags=2, body=new_string("l") + new_string("t") + b"\x00" + varint(n) + fields)
    [record] = BatchDecoder().decode(make_batch(raw, count=1))[1]
    assert len(record.fields) == n


# -- after a failure --------------------------------------------------------------------


def failing_sync_batches() -> list[object]:
    raw = RecordEncoder().encode([rec(100)], 100)
    return [
        pytest.param(make_batch(raw[:-1], count=1, first_seq=100), id="bad-record-data"),
        pytest.param(make_batch(raw, count=1, first_seq=100, raw_len=len(raw) + 1), id="wrong-raw-len"),
        pytest.param(header_bytes(first=100, last=100, count=1) + bytes(41), id="bad-brotli"),
        pytest.param(make_batch(raw, count=1, first_seq=100, lgwin=22), id="window-too-large"),
        pytest.param(header_bytes(flags=SYNC | 0x40, first=100, last=100, count=1), id="bad-header"),
    ]


@pytest.mark.parametrize("bad", failing_sync_batches())
def test_failure_leaves_the_decoder_unusable_until_a_sync_point(bad: bytes) -> None:
    # The docstring: "Every failure raises StreamDecodeError and leaves the
    # decoder unusable until the next sync point."
    batches, payloads = live_stream()
    decoder = BatchDecoder()
    assert decoder.decode(payloads[0])[1] == batches[0]
    with pytest.raises(StreamDecodeError):
        decoder.decode(bad)
    with pytest.raises(StreamDecodeError, match="sync point"):
        decoder.decode(payloads[1])
    # The next sync point recovers.
    assert decoder.decode(payloads[2])[1] == batches[2]
    assert decoder.decode(payloads[3])[1] == batches[3]


# -- properties -------------------------------------------------------------------------

texts = st.text(max_size=30)  # any code points, lone surrogates included
short_names = st.sampled_from(["", "app", "app.db", "MainThread", "ワーカー"]) | texts

records_strategy = st.lists(
    st.builds(
        lambda gap, micros, level, logger, thread, message, exception, fields, source, ids: (
            gap,
            dict(
                timestamp=micros / 1_000_000,
                level=level,
                logger=logger,
                thread=thread,
                message=message,
                exception=exception,
                fields=fields,
                file=source[0],
                function=source[1],
                module=source[2],
                line=source[3],
                process=ids[0],
                thread_id=ids[1],
            ),
        ),
        st.integers(1, 2**40),
        st.integers(-(2**51), 2**51),
        st.integers(0, 255),
        short_names,
        short_names,
        texts,
        st.none() | texts,
        st.dictionaries(short_names, short_names, max_size=4),
        st.tuples(short_names, short_names, short_names, st.integers(0, 2**32 - 1)),
        st.sampled_from([(0, 0), (1234, 140000000000001), (1234, 140000000000002), (2**64 - 1, 1)]),
    ),
    max_size=12,
)


def build_records(first_seq: int, specs: list[tuple[int, dict[str, object]]]) -> list[Record]:
    records = []
    seq = first_seq - 1
    for gap, fields in specs:
        seq += gap
        records.append(Record(seq=seq, **fields))  # type: ignore[arg-type]
    return records


@settings(max_examples=200, deadline=None)
@given(
    first_seq=st.integers(1, 2**62),
    batches=st.lists(records_strategy, min_size=1, max_size=4),
    data=st.data(),
)
def test_record_stream_round_trip_property(
    first_seq: int, batches: list[list[tuple[int, dict[str, object]]]], data: st.DataObject
) -> None:
    encoder, decoder = BatchEncoder(), BatchDecoder()
    for specs in batches:
        records = build_records(first_seq, specs)
        last_seq = (records[-1].seq if records else first_seq - 1) + data.draw(st.integers(0, 3))
        sync = data.draw(st.booleans())
        payload = encoder.encode(records, first_seq=first_seq, last_seq=last_seq, sync=sync)
        header, decoded = decoder.decode(payload)
        assert decoded == records
        assert (header.first_seq, header.last_seq, header.count) == (first_seq, last_seq, len(records))
        first_seq = last_seq + 1


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), count=st.integers(0, 4))
def test_arbitrary_record_data_raises_only_stream_errors(raw: bytes, count: int) -> None:
    try:
        BatchDecoder().decode(make_batch(raw, count=count, last_seq=count + 100))
    except StreamDecodeError:
        pass


@pytest.mark.parametrize(
    ("level", "fields"),
    [(20, None), (25, {"n": 1, "s": "x"}), (5, {}), (300, {"k": None}), (-3, {"a": 1.5})],
)
def test_fast_construction_equals_the_constructor(level: int, fields: dict[str, object] | None) -> None:
    built = Record._build(7, 1700000000.1234567, level, "app.db", "msg", "worker", "trace", fields)
    made = Record(
        seq=7,
        timestamp=1700000000.1234567,
        level=level,
        logger="app.db",
        message="msg",
        thread="worker",
        exception="trace",
        fields=fields,
    )
    assert built == made
    assert type(built.level) is Level

"""Log records, their compact binary encoding, and the compressed batch stream.

Theory of operation
-------------------
An agent sends its records in *batches*.  Each batch is one ``BATCH`` frame: a
small varint header (:meth:`BatchHeader.pack`) that the relay reads (it routes
and counts by it) followed by brotli bytes that only agents write and only viewers read; the
relay forwards them untouched.

The brotli bytes of a data connection form **one streaming compression context**,
flushed after every batch, so each batch reuses everything said before it.  A
decoder can only start at the beginning of a context, so the agent starts a fresh
one at a *sync point* (flag :data:`SYNC`): when the relay asks (a viewer joined or
skipped ahead) and periodically.  Inside a context the records themselves use a
compact binary encoding (below) with a string table that is also reset at each
sync point: logger names, thread names and field keys are sent once per context
and then referred to by number.

Record encoding (all integers are unsigned LEB128 varints unless noted)::

    record   := seq_delta  ts_delta  level:u8  flags:u8  logger  thread  message
                [exception]  [nfields  (key value)*nfields]
                [file  function  module  line]  [process  thread_id]
    seq_delta := seq - previous seq (the first record of a batch: seq - (first_seq - 1)); >= 1
    ts_delta  := zigzag(timestamp_us - previous timestamp_us), previous = 0 at a sync point
    flags     := bit 0: has exception; bit 1: has fields; bit 2: has a source
                 location; bit 3: process/thread ids follow (they differ from
                 the previous record's; both are 0 at a sync point)
    logger, thread, key, value, file, function, module := strref
    line, process, thread_id := varint
    message, exception := text
    text     := len  utf8-bytes
    strref   := 0 text   (a new string, appended to the table)
              | 1 text   (a string not added: long strings, or the table is full)
              | n >= 2   (table entry n - 2)

The table holds at most :data:`STRING_TABLE_MAX` entries; an encoder must not
add to a full table, a decoder rejects a stream that tries.

History (the records a viewer asked for when it joined) travels as separate
self-contained batches flagged :data:`HISTORY` (and :data:`SYNC`), addressed to
one viewer; the last one is flagged :data:`HISTORY_END`.

Decoding is bounded: a batch header announces its uncompressed length, which must
not exceed :data:`MAX_RAW_BATCH`; the decompressor is driven with
``output_buffer_limit`` and we count bytes ourselves, so a decompression bomb
stops at the cap.  A sync batch whose brotli stream header announces a window
larger than :data:`MAX_WINDOW_BITS` is refused, so a hostile agent cannot make
every viewer allocate a 16 MiB window.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs
import brotli

from .errors import LocalProtocolError, StreamDecodeError

__all__ = [
    "HISTORY",
    "HISTORY_END",
    "MAX_BATCH_HEADER",
    "MAX_RAW_BATCH",
    "SYNC",
    "BatchDecoder",
    "BatchEncoder",
    "BatchHeader",
    "Gap",
    "Level",
    "Record",
]


class Level(enum.IntEnum):
    """Severity of a record, with Python logging's numbers."""

    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50

    @classmethod
    def from_number(cls, number: int) -> Level:
        """The highest level at or below ``number`` (DEBUG below 10).

        Custom logging levels (e.g. 25) thus map to the standard level below.
        """
        if 0 <= number < 256:
            return _LEVEL_TABLE[number]
        return cls.CRITICAL if number > 0 else cls.DEBUG

    @classmethod
    def parse(cls, text: str | int) -> Level:
        """Parse ``"info"``, ``"WARNING"``, ``"warn"`` or ``20``.

        Raises:
          ValueError: not a level.
        """
        if isinstance(text, int):
            return cls.from_number(text)
        name = text.strip().upper()
        if name == "WARN":
            name = "WARNING"
        if name == "FATAL":
            name = "CRITICAL"
        if name in cls.__members__:
            return cls[name]
        if name.isdigit():
            return cls.from_number(int(name))
        raise ValueError(f"not a log level: {text!r}")


def _fields_converter(value: Mapping[str, object] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (value or {}).items()}


# Decoding maps a byte to a Level per record: a table lookup, not a search.
_LEVEL_TABLE: Final = [max((level for level in Level if level <= n), default=Level.DEBUG) for n in range(256)]


def _to_level(value: int) -> Level:
    if type(value) is Level:
        return value
    return Level.from_number(value)


_U32: Final = 2**32 - 1
_U64: Final = 2**64 - 1

#: Timestamps beyond this many seconds from the epoch (about year 33,000) are
#: refused: the wire's varints must stay within 64 bits.
MAX_TIMESTAMP: Final = 1e12


def _to_microseconds(value: float) -> float:
    # The wire carries microseconds; rounding here makes a record equal to
    # itself after a round trip.
    value = float(value)
    if not -MAX_TIMESTAMP <= value <= MAX_TIMESTAMP:  # also refuses NaN
        raise ValueError(f"timestamp out of range: {value!r}")
    return round(value * 1_000_000) / 1_000_000


@attrs.frozen(kw_only=True)
class Record:
    """One log record.

    ``seq`` is per session, strictly increasing from 1 and never reused;
    ``timestamp`` is in seconds since the epoch (microsecond precision on the
    wire).
    """

    seq: int
    timestamp: float = attrs.field(converter=_to_microseconds)
    level: Level = attrs.field(converter=_to_level)
    logger: str = ""
    message: str = ""
    thread: str = ""
    exception: str | None = None
    fields: dict[str, str] = attrs.field(factory=dict, converter=_fields_converter)
    #: Source location, when the application has it ("" / 0 when not).
    file: str = ""
    line: int = attrs.field(
        default=0, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(_U32))
    )
    function: str = ""
    module: str = ""
    #: The OS process and thread ids that logged it (0 when unknown).
    process: int = attrs.field(
        default=0, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(_U64))
    )
    thread_id: int = attrs.field(
        default=0, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(_U64))
    )

    @property
    def has_source(self) -> bool:
        return bool(self.file or self.function or self.module or self.line)

    @classmethod
    def _build(
        cls,
        seq: int,
        timestamp: float,
        level: int,
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
    ) -> Record:
        """The same as the constructor, faster: for the agent's hot path.

        Does what the converters do, without attrs' per-field machinery (a
        record is built for every log call).
        """
        record = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(record, "seq", seq)
        setattr_(record, "timestamp", _to_microseconds(timestamp))
        setattr_(
            record,
            "level",
            _LEVEL_TABLE[level] if type(level) is int and 0 <= level < 256 else Level.from_number(level),
        )
        setattr_(record, "logger", logger)
        setattr_(record, "message", message)
        setattr_(record, "thread", thread)
        setattr_(record, "exception", exception)
        setattr_(record, "fields", _fields_converter(fields) if fields else {})
        setattr_(record, "file", file)
        setattr_(record, "line", line if type(line) is int and 0 <= line <= _U32 else 0)
        setattr_(record, "function", function)
        setattr_(record, "module", module)
        setattr_(record, "process", process if type(process) is int and 0 <= process <= _U64 else 0)
        setattr_(record, "thread_id", thread_id if type(thread_id) is int and 0 <= thread_id <= _U64 else 0)
        return record

    def to_json(self) -> dict[str, object]:
        """The record as a JSON-ready dict (``level`` as its name)."""
        return {
            "seq": self.seq,
            "timestamp": self.timestamp,
            "level": self.level.name,
            "logger": self.logger,
            "thread": self.thread,
            "message": self.message,
            "exception": self.exception,
            "fields": dict(self.fields),
            "file": self.file,
            "line": self.line,
            "function": self.function,
            "module": self.module,
            "process": self.process,
            "thread_id": self.thread_id,
        }


@attrs.frozen
class Gap:
    """Records ``first_seq`` … ``last_seq`` (inclusive) that this viewer will not get.

    ``reason`` is machine-readable: ``viewer_slow`` (the relay skipped this viewer
    ahead), ``agent_overflow`` (the agent's buffer dropped them before they were
    sent), ``history_unavailable`` (asked-for history the agent no longer holds),
    ``stream_restart`` (the agent's data connection was replaced).
    """

    first_seq: int
    last_seq: int
    reason: str


# -- the batch header -----------------------------------------------------------

#: Largest BATCH header: flags byte + five 10-byte varints.
MAX_BATCH_HEADER: Final = 1 + 5 * 10
_U64_MAX: Final = 2**64 - 1

#: The batch starts a fresh compression context (and string table).
SYNC: Final = 0x01
#: A history batch for the viewer named in the header (self-contained).
HISTORY: Final = 0x02
#: The last history batch for that viewer; live batches follow from a sync point.
HISTORY_END: Final = 0x04
_KNOWN_FLAGS: Final = SYNC | HISTORY | HISTORY_END

#: Largest uncompressed batch.  Agents cut batches at :data:`TARGET_RAW_BATCH`;
#: a single record may push one over, so the hard cap is higher.  A viewer never
#: inflates more than this per batch, whatever the compressed bytes say.
MAX_RAW_BATCH: Final = 4 * 1024 * 1024

#: Where agents cut a batch (uncompressed bytes).
TARGET_RAW_BATCH: Final = 128 * 1024

#: Longest message or exception kept in a record (UTF-8 bytes); longer text is
#: cut and marked.  With the other limits below, one record encodes to at most
#: about 840 KiB, so a batch of TARGET_RAW_BATCH plus one record always fits a
#: data frame (1 MiB) even when it does not compress at all.
MAX_TEXT: Final = 256 * 1024
#: Longest logger name, thread name or field key (UTF-8 bytes).
MAX_NAME: Final = 1024
#: Longest field value (UTF-8 bytes) and most fields per record.
MAX_FIELD_VALUE: Final = 4096
MAX_FIELDS: Final = 64

#: Entries in a context's string table.
STRING_TABLE_MAX: Final = 4096

#: Strings longer than this are sent literally rather than added to the table.
_INTERN_MAX_LEN: Final = 200

#: The brotli window agents use (256 KiB) and the largest a viewer accepts.
#: NOTES.md: lgwin 16–18 keeps a decompressor at 0.5–2 MiB per session.
WINDOW_BITS: Final = 18
MAX_WINDOW_BITS: Final = 18

#: Quality 5: contexts are reused across flushes (quality 1 does not), and it is
#: about 2x smaller than quality 2 for small batches at live-log rates.
DEFAULT_QUALITY: Final = 5


@attrs.frozen(kw_only=True)
class BatchHeader:
    """The fixed header of a ``BATCH`` frame: all the relay reads of a batch.

    ``first_seq`` … ``last_seq`` is the range of seqs the batch *covers*: every
    record in that range that the stream's level filter let through is in the
    batch (so ``count`` may be lower than the range).  An empty range
    (``first_seq == last_seq + 1``) is allowed, for an empty history.
    """

    flags: int
    viewer: int
    first_seq: int
    last_seq: int
    count: int
    raw_len: int

    @property
    def sync(self) -> bool:
        return bool(self.flags & SYNC)

    @property
    def history(self) -> bool:
        return bool(self.flags & HISTORY)

    @property
    def history_end(self) -> bool:
        return bool(self.flags & HISTORY_END)

    def pack(self) -> bytes:
        """``flags:u8 [viewer] first_seq span count raw_len`` (LEB128 varints).

        ``viewer`` is present only on HISTORY batches; ``span`` is
        ``last_seq - first_seq + 1``.  A live one-record batch header is
        typically 6–8 bytes.
        """
        out = bytearray((self.flags,))
        if self.flags & HISTORY:
            _put_varint(out, self.viewer)
        _put_varint(out, self.first_seq)
        _put_varint(out, self.last_seq - self.first_seq + 1)
        _put_varint(out, self.count)
        _put_varint(out, self.raw_len)
        return bytes(out)

    @classmethod
    def unpack(cls, payload: bytes) -> BatchHeader:
        """Parse and validate the header at the start of a BATCH payload."""
        return cls.parse(payload)[0]

    @classmethod
    def parse(cls, payload: bytes) -> tuple[BatchHeader, int]:
        """Parse and validate the header; also return its length in bytes.

        Raises:
          StreamDecodeError: truncated, unknown flags or inconsistent numbers.
        """
        if not payload:
            raise StreamDecodeError("batch shorter than its header")
        flags = payload[0]
        pos = 1

        def varint() -> int:
            nonlocal pos
            result = shift = 0
            while True:
                if pos >= len(payload):
                    raise StreamDecodeError("batch shorter than its header")
                byte = payload[pos]
                pos += 1
                result |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    if result > _U64_MAX:
                        raise StreamDecodeError("number too large in the batch header")
                    return result
                shift += 7
                if shift > 63:
                    raise StreamDecodeError("number too long in the batch header")

        viewer = varint() if flags & HISTORY else 0
        first = varint()
        span = varint()
        count = varint()
        raw_len = varint()
        last = first + span - 1
        if flags & ~_KNOWN_FLAGS:
            raise StreamDecodeError(f"unknown batch flags 0x{flags:02x}")
        if flags & HISTORY and not flags & SYNC:
            raise StreamDecodeError("history batches must be self-contained (SYNC)")
        if flags & HISTORY_END and not flags & HISTORY:
            raise StreamDecodeError("HISTORY_END without HISTORY")
        if first < 1 or last > _U64_MAX or count > span:
            raise StreamDecodeError(f"inconsistent batch range {first}..{last} with {count} records")
        if raw_len > MAX_RAW_BATCH:
            raise StreamDecodeError(f"batch announces {raw_len} uncompressed bytes (limit {MAX_RAW_BATCH})")
        header = cls(flags=flags, viewer=viewer, first_seq=first, last_seq=last, count=count, raw_len=raw_len)
        return header, pos


# -- varints and the record encoding --------------------------------------------


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zigzag(value: int) -> int:
    return (value << 1) if value >= 0 else ((-value) << 1) - 1


def _unzigzag(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


def text_size(text: str) -> int:
    """UTF-8 size of ``text``; O(1) for ASCII, the common case."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (plus a marker) if longer."""
    if len(text) <= limit // 4 or text_size(text) <= limit:
        return text
    data = text.encode("utf-8", "surrogatepass")
    kept = data[:limit].decode("utf-8", "ignore")
    return kept + f"… [loupelive: {len(data) - len(kept.encode('utf-8', 'surrogatepass'))} bytes cut]"


def clip_record(record: Record) -> Record:
    """``record`` within the size limits (the same object when it already is).

    Cut text is marked, never silently shortened; fields beyond
    :data:`MAX_FIELDS` are replaced by one ``loupelive.fields_cut`` field.
    """
    fields = record.fields
    # Fast path: short strings cannot exceed their byte limits (4 bytes per
    # character at most).
    if (
        not fields
        and len(record.message) <= MAX_TEXT // 4
        and len(record.logger) <= MAX_NAME // 4
        and len(record.thread) <= MAX_NAME // 4
        and (record.exception is None or len(record.exception) <= MAX_TEXT // 4)
        and len(record.file) <= MAX_NAME // 4
        and len(record.function) <= MAX_NAME // 4
        and len(record.module) <= MAX_NAME // 4
    ):
        return record
    fits = (
        text_size(record.message) <= MAX_TEXT
        and (record.exception is None or text_size(record.exception) <= MAX_TEXT)
        and text_size(record.logger) <= MAX_NAME
        and text_size(record.thread) <= MAX_NAME
        and text_size(record.file) <= MAX_NAME
        and text_size(record.function) <= MAX_NAME
        and text_size(record.module) <= MAX_NAME
        and len(fields) <= MAX_FIELDS
        and all(text_size(k) <= MAX_NAME and text_size(v) <= MAX_FIELD_VALUE for k, v in fields.items())
    )
    if fits:
        return record
    items = list(fields.items())
    clipped = {clip_text(k, MAX_NAME): clip_text(v, MAX_FIELD_VALUE) for k, v in items[: MAX_FIELDS - 1]}
    if len(items) >= MAX_FIELDS:
        if len(items) == MAX_FIELDS:
            k, v = items[-1]
            clipped[clip_text(k, MAX_NAME)] = clip_text(v, MAX_FIELD_VALUE)
        else:
            clipped["loupelive.fields_cut"] = str(len(items) - (MAX_FIELDS - 1))
    return attrs.evolve(
        record,
        message=clip_text(record.message, MAX_TEXT),
        exception=None if record.exception is None else clip_text(record.exception, MAX_TEXT),
        logger=clip_text(record.logger, MAX_NAME),
        thread=clip_text(record.thread, MAX_NAME),
        file=clip_text(record.file, MAX_NAME),
        function=clip_text(record.function, MAX_NAME),
        module=clip_text(record.module, MAX_NAME),
        fields=clipped,
    )


class RecordEncoder:
    """Encodes records for one compression context (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new context: empty string table, timestamps from zero."""
        self._table: dict[str, int] = {}
        self._prev_ts = 0
        self._ids = (0, 0)

    def _strref(self, out: bytearray, text: str) -> None:
        index = self._table.get(text)
        if index is not None:
            _put_varint(out, index + 2)
            return
        data = text.encode("utf-8", "surrogatepass")
        if len(data) <= _INTERN_MAX_LEN and len(self._table) < STRING_TABLE_MAX:
            self._table[text] = len(self._table)
            out.append(0)
        else:
            out.append(1)
        _put_varint(out, len(data))
        out += data

    @staticmethod
    def _text(out: bytearray, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        _put_varint(out, len(data))
        out += data

    def encode(self, records: Iterable[Record], first_seq: int) -> bytes:
        """Encode ``records`` (increasing seqs, all >= ``first_seq``)."""
        out = bytearray()
        prev_seq = first_seq - 1
        for record in records:
            record = clip_record(record)
            if record.seq <= prev_seq:
                raise LocalProtocolError("records must have increasing seqs")
            _put_varint(out, record.seq - prev_seq)
            prev_seq = record.seq
            ts = round(record.timestamp * 1_000_000)
            _put_varint(out, _zigzag(ts - self._prev_ts))
            self._prev_ts = ts
            out.append(int(record.level) & 0xFF)
            flags = (1 if record.exception is not None else 0) | (2 if record.fields else 0)
            has_source = record.file or record.function or record.module or record.line
            if has_source:
                flags |= 4
            ids = (record.process, record.thread_id)
            if ids != self._ids:
                flags |= 8
            out.append(flags)
            self._strref(out, record.logger)
            self._strref(out, record.thread)
            self._text(out, record.message)
            if record.exception is not None:
                self._text(out, record.exception)
            if record.fields:
                _put_varint(out, len(record.fields))
                for key, value in record.fields.items():
                    self._strref(out, key)
                    self._strref(out, value)
            if has_source:
                self._strref(out, record.file)
                self._strref(out, record.function)
                self._strref(out, record.module)
                _put_varint(out, record.line)
            if flags & 8:
                _put_varint(out, ids[0])
                _put_varint(out, ids[1])
                self._ids = ids
        return bytes(out)


class RecordDecoder:
    """Decodes what :class:`RecordEncoder` wrote, validating every step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._table: list[str] = []
        self._prev_ts = 0
        self._ids = (0, 0)

    def decode(self, data: bytes, header: BatchHeader) -> list[Record]:
        """Decode exactly ``header.count`` records that fill ``data``.

        Raises:
          StreamDecodeError: anything malformed.
        """
        view = memoryview(data)
        pos = 0
        end = len(data)

        def varint() -> int:
            nonlocal pos
            result = 0
            shift = 0
            while True:
                if pos >= end:
                    raise StreamDecodeError("record data ends inside a number")
                byte = view[pos]
                pos += 1
                result |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    return result
                shift += 7
                if shift > 63:
                    raise StreamDecodeError("number too long in record data")

        def text() -> str:
            nonlocal pos
            length = varint()
            if length > end - pos:
                raise StreamDecodeError("text runs past the end of the batch")
            raw = bytes(view[pos : pos + length])
            pos += length
            try:
                return raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise StreamDecodeError("invalid UTF-8 in record data") from exc

        def strref() -> str:
            tag = varint()
            if tag >= 2:
                try:
                    return self._table[tag - 2]
                except IndexError:
                    raise StreamDecodeError(f"string reference {tag} out of range") from None
            value = text()
            if tag == 0:
                if len(self._table) >= STRING_TABLE_MAX:
                    raise StreamDecodeError("string table overflow")
                self._table.append(value)
            return value

        records: list[Record] = []
        seq = header.first_seq - 1
        for _ in range(header.count):
            delta = varint()
            if delta < 1:
                raise StreamDecodeError("record seqs must increase")
            seq += delta
            if seq > header.last_seq:
                raise StreamDecodeError("record seq beyond the batch range")
            self._prev_ts += _unzigzag(varint())
            if pos + 2 > end:
                raise StreamDecodeError("record data ends inside a record")
            level = view[pos]
            flags = view[pos + 1]
            pos += 2
            if flags & ~15:
                raise StreamDecodeError(f"unknown record flags 0x{flags:02x}")
            logger = strref()
            thread = strref()
            message = text()
            exception = text() if flags & 1 else None
            fields: dict[str, str] = {}
            if flags & 2:
                nfields = varint()
                if nfields > end - pos:
                    raise StreamDecodeError("field count runs past the end of the batch")
                for _ in range(nfields):
                    key = strref()
                    fields[key] = strref()
            file = function = module = ""
            line = 0
            if flags & 4:
                file = strref()
                function = strref()
                module = strref()
                line = varint()
                if line > _U32:
                    raise StreamDecodeError("line number out of range")
            if flags & 8:
                self._ids = (varint(), varint())
            records.append(
                Record(
                    seq=seq,
                    timestamp=self._prev_ts / 1_000_000,
                    level=Level.from_number(level),
                    logger=logger,
                    thread=thread,
                    message=message,
                    exception=exception,
                    fields=fields,
                    file=file,
                    line=line,
                    function=function,
                    module=module,
                    process=self._ids[0],
                    thread_id=self._ids[1],
                )
            )
        if pos != end:
            raise StreamDecodeError(f"{end - pos} stray bytes after the last record")
        return records


# -- compression ----------------------------------------------------------------


def brotli_window_bits(data: bytes) -> int | None:
    """The window size (WBITS) announced by a brotli stream header (RFC 7932 9.1).

    Returns ``None`` if ``data`` is too short to tell or announces the
    non-standard large window.
    """
    if not data:
        return None
    bits = data[0] | ((data[1] << 8) if len(data) > 1 else 0)
    if not bits & 1:
        return 16
    n = (bits >> 1) & 0x7
    if n:
        return 17 + n
    if len(data) < 1:
        return None
    m = (bits >> 4) & 0x7
    if m == 1:
        return None  # large-window brotli: never accepted
    if m:
        return 8 + m
    return 17


class BatchEncoder:
    """The agent's side: records in, BATCH payloads out, one context per stream.

    Args:
      quality: brotli quality (2–11; 5 by default, see :data:`DEFAULT_QUALITY`).
    """

    def __init__(self, *, quality: int = DEFAULT_QUALITY) -> None:
        if not 2 <= quality <= 11:
            raise ValueError("brotli quality must be 2..11 (1 does not reuse context)")
        self.quality = quality
        self._records = RecordEncoder()
        self._compressor: brotli.Compressor | None = None

    def _new_compressor(self) -> brotli.Compressor:
        return brotli.Compressor(mode=brotli.MODE_TEXT, quality=self.quality, lgwin=WINDOW_BITS)

    def prepare(
        self,
        records: Sequence[Record],
        *,
        first_seq: int,
        last_seq: int,
        sync: bool = False,
    ) -> PreparedBatch:
        """Encode the records of a live batch covering ``first_seq..last_seq``.

        The first step of :meth:`encode`: pure Python, holds the GIL.  Pass the
        result to :meth:`compress` next (before preparing another live batch).
        ``sync`` starts a new context; the first batch of an encoder always does.
        """
        if sync or self._compressor is None:
            self._records.reset()
            sync = True
            self._compressor = None
        raw = self._records.encode(records, first_seq)
        header = BatchHeader(
            flags=SYNC if sync else 0,
            viewer=0,
            first_seq=first_seq,
            last_seq=last_seq,
            count=len(records),
            raw_len=len(raw),
        )
        return PreparedBatch(header=header, raw=raw)

    def prepare_history(
        self,
        records: Sequence[Record],
        *,
        viewer: int,
        first_seq: int,
        last_seq: int,
        end: bool,
    ) -> PreparedBatch:
        """Encode a self-contained history batch for one viewer (its own context)."""
        raw = RecordEncoder().encode(records, first_seq)
        header = BatchHeader(
            flags=SYNC | HISTORY | (HISTORY_END if end else 0),
            viewer=viewer,
            first_seq=first_seq,
            last_seq=last_seq,
            count=len(records),
            raw_len=len(raw),
        )
        return PreparedBatch(header=header, raw=raw)

    def compress(self, batch: PreparedBatch) -> bytes:
        """The BATCH payload of a prepared batch.

        brotli releases the GIL here, so a large batch may be compressed in a
        worker thread (``trio.to_thread.run_sync``).
        """
        if batch.header.history:
            compressor = self._new_compressor()
            return batch.header.pack() + compressor.process(batch.raw) + compressor.finish()  # type: ignore[no-any-return]
        if batch.header.sync or self._compressor is None:
            self._compressor = self._new_compressor()
        compressed: bytes = self._compressor.process(batch.raw) + self._compressor.flush()
        return batch.header.pack() + compressed

    def encode(
        self,
        records: Sequence[Record],
        *,
        first_seq: int,
        last_seq: int,
        sync: bool = False,
    ) -> bytes:
        """A live batch covering ``first_seq..last_seq``; ``sync`` starts a context."""
        return self.compress(self.prepare(records, first_seq=first_seq, last_seq=last_seq, sync=sync))

    def encode_history(
        self,
        records: Sequence[Record],
        *,
        viewer: int,
        first_seq: int,
        last_seq: int,
        end: bool,
    ) -> bytes:
        """A self-contained history batch for one viewer (its own context)."""
        return self.compress(
            self.prepare_history(records, viewer=viewer, first_seq=first_seq, last_seq=last_seq, end=end)
        )


@attrs.frozen
class PreparedBatch:
    """Records encoded for a batch, not yet compressed."""

    header: BatchHeader
    raw: bytes


class BatchDecoder:
    """The viewer's side: BATCH payloads in, records out.

    Decoding starts at a sync point; a batch that is not one, before any sync
    point, is an error.  Every failure raises :class:`StreamDecodeError` and
    leaves the decoder unusable until the next sync point.
    """

    def __init__(self, *, max_raw: int = MAX_RAW_BATCH) -> None:
        self.max_raw = max_raw
        self._decompressor: brotli.Decompressor | None = None
        self._records = RecordDecoder()

    def decode(self, payload: bytes) -> tuple[BatchHeader, list[Record]]:
        """Decode one BATCH payload.

        Raises:
          StreamDecodeError: malformed header, undecodable or oversized data.
        """
        try:
            header, size = BatchHeader.parse(payload)
            data = payload[size:]
            if header.sync:
                bits = brotli_window_bits(data) if data else MAX_WINDOW_BITS
                if bits is None or bits > MAX_WINDOW_BITS:
                    raise StreamDecodeError(
                        f"brotli window of 2**{bits} bytes is larger than the accepted 2**{MAX_WINDOW_BITS}"
                    )
                self._decompressor = brotli.Decompressor()
                self._records.reset()
            elif self._decompressor is None:
                raise StreamDecodeError("stream does not start at a sync point")
            raw = self._inflate(self._decompressor, data, min(header.raw_len, self.max_raw))
            if len(raw) != header.raw_len:
                raise StreamDecodeError(f"batch inflated to {len(raw)} bytes, header said {header.raw_len}")
            records = self._records.decode(raw, header)
        except StreamDecodeError:
            # Whatever failed, the context is lost until the next sync point.
            self._decompressor = None
            raise
        if header.history:
            # History batches are self-contained; the live stream resumes at
            # its next sync point.
            self._decompressor = None
        return header, records

    @staticmethod
    def _inflate(decompressor: brotli.Decompressor, data: bytes, cap: int) -> bytes:
        # brotli's output_buffer_limit is approximate (NOTES.md: up to ~2x + 32
        # KiB), so we count ourselves and stop as soon as we pass the cap.
        limit = max(cap, 1) + 1
        chunks: list[bytes] = []
        total = 0
        try:
            chunk = decompressor.process(data, output_buffer_limit=limit)
            while chunk:
                total += len(chunk)
                if total > cap:
                    raise StreamDecodeError(f"batch inflates past its announced {cap} bytes")
                chunks.append(chunk)
                chunk = decompressor.process(b"", output_buffer_limit=limit)
        except brotli.error as exc:
            raise StreamDecodeError(f"brotli error: {exc}") from exc
        return b"".join(chunks)

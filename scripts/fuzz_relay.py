#!/usr/bin/env python3
"""Fuzz a real relay with mutated protocol frames, beside a well-behaved session.

::

    python scripts/fuzz_relay.py [--frames N] [--seed S] [--tcp] [--out PATH]
        [--concurrency C] [--verbose]

What runs (one process, one Trio loop)
--------------------------------------
* **A relay**: ``loupelive.serve_relay`` with ``RelayConfig(host="127.0.0.1",
  agent_port=0, viewer_port=0, handshake_timeout=2.0)``; heartbeats, graces and
  limits stay at their defaults, with one exception: ``auth_failures_before_delay``
  is set out of reach.  Every fuzzing connection comes from one address
  (``"peer"`` for in-memory streams, 127.0.0.1 over TCP), and after 5 failed
  handshakes a minute the relay delays each further rejection by up to 5 s
  (ARCHITECTURE.md §4, "slowed guessing"): with the default the run would time
  that sleep instead of the parser.
* **A well-behaved session**: one ``open_agent`` logging ~500 records/s (with a
  ring buffer that holds the whole run, so a hole can only be the relay's) and
  one ``open_viewer`` + ``open_stream(after_seq=0)`` that must receive every
  record exactly once, in order.
* **The fuzzer**: ``--concurrency`` workers (50), each running one job at a time
  until ``--frames`` frames were thrown.  Connections are in-memory streams from
  ``Relay.memory_connector`` (lockstep: a write completes as the relay reads
  it), or real loopback sockets with ``--tcp``.  A job builds a valid sequence,
  mutates it, sends it (in one write or in pieces), reads whatever the relay
  answers and closes, never waiting longer than a bound (``trio.move_on_after``:
  3.5 s per connection, 12 s per multi-connection job).  Jobs:

  ``agent_control``
      preamble + HELLO registering a session (a pool of 24 session ids with
      known secrets, so sessions are taken over and re-attached; the live
      session's id without its secret; fresh and odd ids; random tags) +
      heartbeats, GOODBYE, CLOSE, messages of every other kind, batches, bytes;
  ``agent_data``
      HELLO for the live session (its real stream number, guessed keys), a pool
      or unknown session, then BATCH / GAP / STREAM_END / heartbeats;
  ``viewer_control`` / ``viewer_data``
      HELLO (viewer_data: the live session, pool, unknown and odd ids; history,
      min_level, after_seq), then heartbeats, CLOSE and junk;
  ``garbage``
      random bytes, HTTP requests, a TLS ClientHello, wrong magic or version, a
      bare or partial preamble, nothing at all;
  ``stream``
      the data path end to end: a fresh (or pool) session registered on a raw
      control connection, one or two raw viewer_data connections, the real
      START_STREAM key read from the control connection, then an agent_data
      connection carrying mutated history batches (addressed to the real viewer
      ids), live batches (``BatchEncoder``), GAPs and STREAM_END; sometimes a
      second round on the restarted stream; the session ended by GOODBYE, by a
      lost connection, or by a takeover with the secret.

  Mutations: JSON level (a value of a wrong type, a dropped or unknown key, very
  long strings, deeply nested JSON, lone surrogates, NaN and infinities, huge
  integers, duplicate keys, BOMs, invalid UTF-8, a top level that is not an
  object) and byte level (bit flips, inserted and deleted bytes, truncation,
  length fields set to 0, off by a few, the exact limits, or 2**32 - 1, random
  kinds, duplicated, dropped, swapped and inserted frames, floods of one frame,
  corrupted batch headers, payloads padded to the limits, a broken preamble).
  Endings: half-close and read to the relay's close, linger until quiet, close
  at once (``--tcp``: sometimes with an RST), or wait for the relay's deadline.

At the end
----------
If the relay dies (an exception escapes a connection handler, so ``serve_relay``
raises), fuzzing stops at once; the crash is reported with its traceback and
the input that caused it, which is then sent alone to a fresh relay to see
whether it kills that one too; and a new relay with a new well-behaved session
is started to fuzz on (at most 20 times), so that a run always throws its
frames and the checks below run on the relay's last life.

The well-behaved viewer must have every record exactly once and in order; a new
agent and viewer must exchange a record; once the fuzzing sessions have passed
their ``agent_grace`` the relay must hold only the well-behaved session and its
four connections (``statistics()`` and the relay's open-connection count) with no
queued bytes; after the well-behaved ones close, nothing at all (a leak is
reported with where the relay's remaining tasks wait).  A logging handler on
the ``loupelive.relay`` logger keeps every ERROR record: one with a traceback
("internal error") is a relay bug.  Each distinct one is reported with its
traceback, the input of the job that triggered it (attributed through a
context variable that the relay's connection task inherits from the connecting
task, or over TCP through the peer port in the log line) and the jobs that used
the same session id at the time (for races); single-connection inputs are
replayed once to see whether they reproduce alone.  The exit status is 1 if any
check failed or any internal error was logged.

Prints frames/s, what the connections saw and the relay's rejections by code;
writes a JSON summary to ``--out`` (default ``benchmarks/fuzz.json``), which
keeps the last run of each transport (``runs.memory``, ``runs.tcp``).  Inputs
derive from ``--seed`` and the job number; what the relay does with them also
depends on timing, so a run is not exactly repeatable.
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import copy
import dataclasses
import itertools
import json
import logging
import math
import random
import re
import socket
import string
import struct
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import brotli
import trio
import trio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compression import machine_info

import loupelive
from loupelive import ErrorCode, Level, Record, RelayConfig
from loupelive.connection import Connector
from loupelive.errors import RemoteProtocolError
from loupelive.records import HISTORY, MAX_RAW_BATCH, SYNC, BatchEncoder, BatchHeader
from loupelive.wire import (
    HEADER,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameKind,
    Preamble,
    encode_preamble,
)

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = REPO_ROOT / "benchmarks" / "fuzz.json"

HANDSHAKE_TIMEOUT: Final = 2.0
#: Longest a single-connection job may take (the relay's handshake deadline + margin).
CONNECTION_BOUND: Final = HANDSHAKE_TIMEOUT + 1.5
#: Longest a multi-connection ("stream") job may take.
STREAM_JOB_BOUND: Final = 12.0
#: A lingering connection closes after this much silence from the relay …
QUIET: Final = 0.05
#: … or after this long in any case.
LINGER_MAX: Final = 0.3
#: How long a stream job waits for one answer of the relay (ACCEPT, START_STREAM).
ANSWER_WAIT: Final = 2.0

#: How long a stream job waits for the relay to close a control connection after GOODBYE.
GOODBYE_WAIT: Final = 0.5

#: The well-behaved agent logs this many records per tick.
STEADY_RECORDS: Final = 10
STEADY_TICK: Final = 0.02

#: Session ids with secrets the fuzzer knows: registered, taken over, re-attached.
POOL_SIZE: Final = 24
#: Finished jobs kept for attributing an internal error logged after they ended.
RECENT_JOBS: Final = 1000
#: After this many crashes the run stops instead of starting yet another relay.
MAX_RELAY_LIVES: Final = 20
#: Examples kept per distinct internal error.
EXAMPLES_PER_ERROR: Final = 3

Port = Literal["agent", "viewer"]

#: The job whose connection a relay task serves: relay tasks started by
#: ``memory_connector`` inherit the context of the task that connected.
JOB: contextvars.ContextVar[int | None] = contextvars.ContextVar("fuzz_job", default=None)

ERROR_CODES: Final = [code.value for code in ErrorCode]
ROLES: Final = ("agent_control", "agent_data", "viewer_control", "viewer_data")
KNOWN_KINDS: Final = [int(kind) for kind in FrameKind]
#: Viewer → relay statistics requests, where this version of the protocol has them.
GET_STATS: Final[int | None] = int(FrameKind["GET_STATS"]) if "GET_STATS" in FrameKind.__members__ else None
GAP_REASONS: Final = ("viewer_slow", "agent_overflow", "history_unavailable", "stream_restart", "missing")

_CHARSETS: Final = (
    string.ascii_letters + string.digits,
    "-_.",
    "éüßøñçÅ",
    "日本語中文한국어",
    "😀🎉🚀🧪",
    "\u0301\u0308\u20dd",
    "\u202e\u200f\u200b\u2028",
    " \t\r\n",
    '"\\/{}[]:,',
)

INTERESTING_INTS: Final = (
    0,
    1,
    2,
    127,
    128,
    255,
    2**31 - 1,
    2**32 - 1,
    2**32,
    2**53,
    2**63,
    2**64 - 1,
    2**64,
    2**70,
    MAX_RAW_BATCH,
    MAX_RAW_BATCH + 1,
)


# -- random material ------------------------------------------------------------------


def rand_text(rng: random.Random, lo: int = 0, hi: int = 24) -> str:
    alphabet = "".join(rng.sample(_CHARSETS, k=rng.randint(1, 3)))
    return "".join(rng.choices(alphabet, k=rng.randint(lo, hi)))


def rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pool_id(index: int) -> str:
    return f"fuzz-pool-{index}"


def pool_secret(index: int) -> str:
    return f"pool-secret-{index}-0123456789"


def odd_session_id(rng: random.Random) -> str:
    return rng.choice(
        [
            "a",
            "x" * 64,
            "x" * 65,
            "",
            "ü" * 5,
            "١٢٣",
            "Ⅻ",
            "a b",
            "a/b",
            "../etc",
            "a\x00b",
            "\ud800",
            "-",
            ".",
            "_" * 10,
            rand_text(rng, 1, 70),
        ]
    )


class Raw:
    """A piece of JSON text put verbatim where this object stands (see :func:`dumps`)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(obj: object, *, ensure_ascii: bool = False) -> str:
    """``json.dumps`` that allows NaN and splices :class:`Raw` texts in."""
    raws: list[str] = []

    def default(value: object) -> object:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@RAW{len(raws) - 1}@@"
        raise TypeError(f"cannot encode {type(value).__name__}")

    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=True, default=default)
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{index}@@"', raw, 1)
    return text


def deep_json(rng: random.Random) -> Raw:
    depth = rng.choice([64, 900, 1100, 5000, 50_000])
    if rng.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "0" + "}" * depth)


def weird_value(rng: random.Random) -> object:
    """A JSON value of a type or size that no field expects."""
    makers: list[Callable[[], object]] = [
        lambda: None,
        lambda: True,
        lambda: False,
        lambda: rng.choice(INTERESTING_INTS),
        lambda: -rng.choice(INTERESTING_INTS),
        lambda: rng.choice([0.5, -0.0, 1e308, -1e308, 5e-324, 1.5, 1e15]),
        lambda: rng.choice([math.nan, math.inf, -math.inf]),
        lambda: Raw("1" + "0" * rng.choice([20, 309, 400, 4299, 4400])),
        lambda: Raw(rng.choice(["1e400", "-1e400", "1e-400", "-0", "0e0", "1E+2"])),
        lambda: rng.choice(["", "x", "\x00", "\ud800", "x\udfffy", "\ufeff", "null", "NaN"]),
        lambda: rand_text(rng, 0, 40),
        lambda: "x" * rng.choice([1025, 4097, 65_537]),
        lambda: rng.choice(ROLES),
        lambda: rng.choice(ERROR_CODES),
        lambda: rng.choice([[], [1, "a", None], {}, {"a": {"b": []}}, [0] * 1000]),
        lambda: deep_json(rng),
    ]
    return rng.choice(makers)()


def random_tags(rng: random.Random) -> dict[str, object]:
    r = rng.random()
    if r < 0.5:
        return {rand_text(rng, 1, 12): rand_text(rng, 0, 30) for _ in range(rng.randint(0, 6))}
    if r < 0.7:
        return {}
    if r < 0.8:
        return {f"k{i}": "v" for i in range(rng.choice([64, 65, 200]))}
    if r < 0.9:
        return {"k" * rng.choice([1024, 1025]): "v" * rng.choice([1024, 1025])}
    return {rand_text(rng, 1, 5): weird_value(rng)}


def random_session(rng: random.Random, session_id: object) -> dict[str, object]:
    info: dict[str, object] = {
        "session_id": session_id,
        "app": rand_text(rng, 0, 30),
        "app_version": rand_text(rng, 0, 10),
        "host": rand_text(rng, 0, 20),
        "pid": rng.randrange(0, 2**32),
        "user": rand_text(rng, 0, 12),
        "started_at": time.time() - rng.random() * 1e5,
        "tags": random_tags(rng),
    }
    if rng.random() < 0.1:
        # The relay's own fields, which it ignores from an agent.
        info.update(connected_at=rng.random() * 1e9, viewers=rng.randrange(100), streaming=True, status="x")
    return info


# -- JSON mutations ------------------------------------------------------------------------


def _slots(obj: object, path: str = "") -> Iterator[tuple[dict[str, Any] | list[Any], Any, str]]:
    """Every (container, key, path) in a JSON tree."""
    if isinstance(obj, dict):
        for key in list(obj):
            yield obj, key, f"{path}.{key}"
            yield from _slots(obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and len(obj) < 50:
        for index in range(len(obj)):
            yield obj, index, f"{path}[{index}]"
            yield from _slots(obj[index], f"{path}[{index}]")


def _dicts(obj: object) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        found.append(obj)
        for value in obj.values():
            found.extend(_dicts(value))
    return found


JSON_OPS: Final = (
    ("wrong_type", 30),
    ("drop_key", 12),
    ("extra_key", 8),
    ("long_string", 8),
    ("deep", 5),
    ("surrogate", 6),
    ("nan", 5),
    ("huge_int", 6),
    ("unicode", 6),
)
TEXT_OPS: Final = (
    ("dup_key", 4),
    ("bom", 2),
    ("bad_utf8", 4),
    ("trailing", 3),
    ("non_object", 3),
    ("truncate_json", 3),
    ("whitespace", 2),
)


def _pick(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    names = [name for name, _ in table]
    weights = [weight for _, weight in table]
    return rng.choices(names, weights)[0]


def mutate_json(rng: random.Random, obj: dict[str, Any], ops: list[str]) -> bytes:
    """A mutated JSON payload from ``obj`` (not modified); appends what was done to ``ops``."""
    obj = copy.deepcopy(obj)
    for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1)):
        op = _pick(rng, JSON_OPS)
        slots = list(_slots(obj))
        if op == "extra_key" or not slots:
            target = rng.choice(_dicts(obj) or [obj])
            key = rng.choice([rand_text(rng, 1, 8), "role", "session", "code", "__proto__", ""])
            target[key] = weird_value(rng)
            ops.append(f"json:extra_key:{key!r}")
            continue
        # Numbers get three times the attention: type and range confusion lives there.
        weights = [3 if type(c[k]) in (int, float) else 1 for c, k, _ in slots]
        container, key, path = rng.choices(slots, weights)[0]
        if op == "drop_key" and isinstance(container, dict):
            del container[key]
        elif op == "long_string":
            container[key] = "x" * rng.choice([1025, 4097, 65_537, 200_000, 262_200])
        elif op == "deep":
            container[key] = deep_json(rng)
        elif op == "surrogate":
            container[key] = rng.choice(["\ud800", "x\udfffy", Raw('"\\ud800"'), Raw('"\\udc00\\ud800x"')])
        elif op == "nan":
            container[key] = rng.choice([math.nan, math.inf, -math.inf])
        elif op == "huge_int":
            container[key] = Raw(rng.choice(["", "-"]) + "1" + "0" * rng.choice([19, 20, 309, 400, 4400]))
        elif op == "unicode":
            container[key] = rand_text(rng, 1, 40)
        else:
            op = "wrong_type"
            container[key] = weird_value(rng)
        ops.append(f"json:{op}@{path}")
    data = dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if rng.random() < 0.25:
        op = _pick(rng, TEXT_OPS)
        ops.append(f"text:{op}")
        if op == "dup_key" and data.startswith(b"{"):
            key = rng.choice(["role", "session", "session_id", "stream", "code"])
            data = (
                b'{"'
                + key.encode()
                + b'":'
                + dumps(weird_value(rng)).encode("utf-8", "surrogatepass")
                + b","
                + data[1:]
            )
        elif op == "bom":
            data = b"\xef\xbb\xbf" + data
        elif op == "bad_utf8":
            at = rng.randint(0, len(data))
            bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xc3"])
            data = data[:at] + bad + data[at:]
        elif op == "trailing":
            data += rng.choice([b",", b"}", b" x", b"\x00", b"{}", b"\n\n"])
        elif op == "non_object":
            data = rng.choice([b"[" + data + b"]", b"null", b"1", b'"s"', b"[]", b"true", b""])
        elif op == "truncate_json":
            data = data[: rng.randint(0, max(len(data) - 1, 0))]
        else:
            data = b" \n\t" * rng.randint(1, 100) + data + b" " * rng.randint(0, 100)
    return data


# -- frames ------------------------------------------------------------------------------------


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def jframe(kind: int, obj: object) -> bytes:
    return frame(kind, dumps(obj).encode("utf-8", "surrogatepass"))


def varint(value: int, *, overlong: int = 0) -> bytes:
    """LEB128, any size; ``overlong`` pads with redundant continuation bytes."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or overlong:
            out.append(byte | 0x80)
            if not value:
                overlong -= 1
        else:
            out.append(byte)
            return bytes(out)


def pack_header(
    flags: int, viewer: int, first: int, span: int, count: int, raw_len: int, overlong: dict[str, int]
) -> bytes:
    out = bytearray((flags & 0xFF,))
    if flags & HISTORY:
        out += varint(viewer, overlong=overlong.get("viewer", 0))
    for name, value in (("first", first), ("span", span), ("count", count), ("raw_len", raw_len)):
        out += varint(value, overlong=overlong.get(name, 0))
    return bytes(out)


def mutate_batch_header(rng: random.Random, payload: bytes, ops: list[str]) -> bytes:
    """A BATCH payload whose varint header is corrupted (the brotli bytes kept)."""
    try:
        header, size = BatchHeader.parse(payload)
    except loupelive.StreamDecodeError:
        ops.append("batch:cut")
        return payload[: rng.randint(0, min(len(payload), 12))]
    body = payload[size:]
    fields = {
        "flags": header.flags,
        "viewer": header.viewer,
        "first": header.first_seq,
        "span": header.last_seq - header.first_seq + 1,
        "count": header.count,
        "raw_len": header.raw_len,
    }
    overlong: dict[str, int] = {}
    changed = []
    for name in rng.sample(list(fields), k=rng.randint(1, 3)):
        if name == "flags":
            fields[name] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x80, 0xFF])
        elif rng.random() < 0.2:
            overlong[name] = rng.choice([1, 5, 9, 12])
        else:
            fields[name] = rng.choice(INTERESTING_INTS)
        changed.append(name)
    if rng.random() < 0.1:
        ops.append("batch:header_only")
        body = b""
    ops.append(f"batch:{'+'.join(changed)}")
    return (
        pack_header(
            fields["flags"],
            fields["viewer"],
            fields["first"],
            fields["span"],
            fields["count"],
            fields["raw_len"],
            overlong,
        )
        + body
    )


# -- a library of valid batches ---------------------------------------------------------------


@dataclasses.dataclass
class Story:
    """A consistent history + live stream: what one agent could really send."""

    #: History batches (header with a placeholder viewer, brotli bytes).
    history: list[tuple[BatchHeader, bytes]]
    #: Live BATCH payloads, the first a sync point.
    live: list[bytes]


def random_record(rng: random.Random, seq: int, *, big: bool = False) -> Record:
    size = rng.choice([0, 5, 20, 80, 300]) if not big else rng.choice([70_000, 300_000])
    message = rand_text(rng, size, size) if size < 1000 else "".join(rng.choices(string.printable, k=size))
    if rng.random() < 0.03:
        message += "\ud800"  # the record encoding carries lone surrogates (surrogatepass)
    return Record(
        seq=seq,
        timestamp=rng.choice([time.time() + rng.uniform(-5, 5), 0.0, -1e9, 1e11, 1e-6]),
        level=rng.choice([10, 20, 20, 20, 30, 40, 50, 0, 5, 25, 255]),
        logger=rng.choice(["app", "app.db", "", "x" * 300, rand_text(rng, 0, 20)]),
        thread=rng.choice(["MainThread", "worker-1", "", rand_text(rng, 0, 10)]),
        message=message,
        exception=rng.choice([None, None, None, "Traceback (most recent call last):\n  ...\nValueError: x"]),
        fields={rand_text(rng, 1, 8): rand_text(rng, 0, 20) for _ in range(rng.choice([0, 0, 1, 3, 70]))},
    )


def make_story(rng: random.Random, index: int) -> Story:
    encoder = BatchEncoder()
    start = rng.choice([1, 1, 1, rng.randint(2, 10**6), 2**62])
    big = index < 2
    history: list[tuple[BatchHeader, bytes]] = []
    held = rng.choice([0, 1, 5, 30])
    if held == 0:
        payload = encoder.encode_history([], viewer=1, first_seq=start, last_seq=start - 1, end=True)
        header, size = BatchHeader.parse(payload)
        history.append((header, payload[size:]))
    else:
        records = [random_record(rng, start + i) for i in range(held)]
        cuts = sorted(rng.sample(range(1, held), k=min(held - 1, rng.randint(0, 2)))) if held > 1 else []
        bounds = [0, *cuts, held]
        for i in range(len(bounds) - 1):
            chunk = records[bounds[i] : bounds[i + 1]]
            payload = encoder.encode_history(
                chunk,
                viewer=1,
                first_seq=chunk[0].seq,
                last_seq=chunk[-1].seq,
                end=i == len(bounds) - 2,
            )
            header, size = BatchHeader.parse(payload)
            history.append((header, payload[size:]))
    live: list[bytes] = []
    seq = start + held
    for i in range(rng.randint(1, 10)):
        span = rng.randint(1, 20)
        count = rng.randint(0, span) if rng.random() < 0.3 else span
        seqs = sorted(rng.sample(range(seq, seq + span), k=count))
        records = [random_record(rng, s, big=big and j == 0) for j, s in enumerate(seqs)]
        live.append(
            encoder.encode(
                records, first_seq=seq, last_seq=seq + span - 1, sync=i == 0 or rng.random() < 0.15
            )
        )
        seq += span
    return Story(history=history, live=live)


class Library:
    """Valid batches, built once per run from the seed."""

    def __init__(self, rng: random.Random) -> None:
        self.stories = [make_story(rng, i) for i in range(40)]
        self.batches = [payload for story in self.stories for payload in story.live]
        # A batch whose brotli bytes inflate to 4 MiB with a 16 MiB window: the
        # relay never inflates; a viewer must refuse it.
        bomb: bytes = brotli.compress(bytes(MAX_RAW_BATCH), quality=2, lgwin=24)
        self.bomb: bytes = pack_header(SYNC, 0, 1, 1, 1, MAX_RAW_BATCH, {}) + bomb

    def history_for(self, story: Story, viewer: int) -> list[bytes]:
        return [
            frame(FrameKind.BATCH, attrs.evolve(header, viewer=viewer).pack() + body)
            for header, body in story.history
        ]

    def random_batch(self, rng: random.Random) -> bytes:
        if rng.random() < 0.02:
            return self.bomb
        return rng.choice(self.batches)


# -- byte-level mutations of a frame sequence ----------------------------------------------------


WIRE_OPS: Final = (
    ("bitflip", 12),
    ("insert_bytes", 7),
    ("delete_bytes", 7),
    ("truncate", 8),
    ("length", 12),
    ("kind", 8),
    ("dup", 7),
    ("drop", 5),
    ("swap", 4),
    ("insert_frame", 10),
    ("flood", 2),
    ("batch_header", 8),
    ("pad_max", 1),
    ("preamble", 3),
)

SCOPES: Final = (("followups", 55), ("hello", 25), ("all", 15), ("none", 5))


@dataclasses.dataclass
class Wire:
    """What one connection sends: a preamble (or not) and frames; frame 0 is usually HELLO."""

    preamble: bytes
    frames: list[bytes]

    def join(self) -> bytes:
        return self.preamble + b"".join(self.frames)


def mutate_wire(
    rng: random.Random, wire: Wire, ops: list[str], library: Library, *, scope: str | None = None
) -> bytes:
    """Mutate ``wire`` in place (frames) and return the bytes to send."""
    scope = scope or _pick(rng, SCOPES)
    if scope == "followups" and len(wire.frames) < 2:
        scope = "hello"
    ops.append(f"scope:{scope}")
    if scope == "none":
        return wire.join()
    first = 1 if scope == "followups" else 0
    truncate_at: float | None = None
    for _ in range(1 + min(int(rng.expovariate(1.0)), 4)):
        if not wire.frames:
            wire.frames.append(b"")
        op = _pick(rng, WIRE_OPS)
        if op == "preamble" and scope != "all":
            op = "bitflip"
        first = min(first, len(wire.frames) - 1)
        index = rng.randrange(first, len(wire.frames))
        target = bytearray(wire.frames[index])
        if op == "bitflip" and target:
            for _ in range(rng.randint(1, 8)):
                target[rng.randrange(len(target))] ^= 1 << rng.randrange(8)
        elif op == "insert_bytes":
            at = rng.randint(0, len(target))
            target[at:at] = rng.choice([rng.randbytes(rng.randint(1, 32)), b"\x00" * 4, b"\xff" * 4])
        elif op == "delete_bytes" and target:
            at = rng.randrange(len(target))
            del target[at : at + rng.randint(1, 32)]
        elif op == "truncate":
            truncate_at = rng.random()
        elif op == "length" and len(target) >= 5:
            length = len(target) - 5
            value = rng.choice(
                [
                    0,
                    max(length - rng.randint(1, 8), 0),
                    length + rng.randint(1, 8),
                    length + rng.randint(9, 5000),
                    MAX_CONTROL_PAYLOAD,
                    MAX_CONTROL_PAYLOAD + 1,
                    MAX_DATA_PAYLOAD,
                    MAX_DATA_PAYLOAD + 1,
                    2**31,
                    2**32 - 1,
                    rng.getrandbits(32),
                ]
            )
            struct.pack_into(">I", target, 0, value)
            op = f"length={value}"
        elif op == "kind" and len(target) >= 5:
            kind = rng.choice([*KNOWN_KINDS, 0, 6, 9, 16, 19, 24, 29, 33, 127, 255, rng.randrange(256)])
            target[4] = kind
            op = f"kind={kind}"
        elif op == "dup":
            wire.frames.insert(rng.randint(index, len(wire.frames)), bytes(target))
        elif op == "drop" and len(wire.frames) > 1:
            del wire.frames[index]
            ops.append(op)
            continue
        elif op == "swap" and len(wire.frames) - first >= 2:
            other = rng.randrange(first, len(wire.frames))
            wire.frames[index], wire.frames[other] = wire.frames[other], wire.frames[index]
            ops.append(op)
            continue
        elif op == "insert_frame":
            new = random_frame(rng, library)
            wire.frames.insert(rng.randint(first, len(wire.frames)), new)
            ops.append(f"insert_frame:{new[4] if len(new) > 4 else '?'}")
            continue
        elif op == "flood":
            wire.frames[index + 1 : index + 1] = [bytes(target)] * rng.randint(20, 300)
        elif op == "batch_header" and len(target) > 5 and target[4] == FrameKind.BATCH:
            payload = mutate_batch_header(rng, bytes(target[5:]), ops)
            target = bytearray(frame(FrameKind.BATCH, payload))
        elif op == "pad_max" and len(target) >= 5:
            limit = MAX_DATA_PAYLOAD if target[4] == FrameKind.BATCH else MAX_CONTROL_PAYLOAD
            size = limit + rng.choice([-1, 0, 1])
            if target[4] == FrameKind.BATCH:
                payload = bytes(target[5:21]) + rng.randbytes(64) * (size // 64 + 1)
                payload = payload[:size]
            else:
                filler = '{"pad":"' + "p" * size + '"}'
                payload = filler.encode()[: size - 2] + b'"}'
            target = bytearray(frame(target[4], payload))
            op = f"pad_max:{size - limit:+d}"
        elif op == "preamble":
            preamble = bytearray(wire.preamble or encode_preamble())
            choice = rng.randrange(4)
            if choice == 0:
                struct.pack_into(">H", preamble, 8, rng.choice([0, 2, 255, 65535]))
            elif choice == 1:
                preamble[rng.randrange(8)] ^= 1 << rng.randrange(8)
            elif choice == 2:
                preamble = preamble[: rng.randrange(10)]
            else:
                preamble = preamble + preamble
            wire.preamble = bytes(preamble)
            ops.append(f"preamble:{choice}")
            continue
        else:
            op = f"{op}(noop)"
        wire.frames[index] = bytes(target)
        ops.append(op)
    data = wire.join()
    if truncate_at is not None:
        keep = len(wire.preamble) + (len(wire.frames[0]) if first and wire.frames else 0)
        cut = keep + int((len(data) - keep) * truncate_at)
        data = data[:cut]
        ops.append("truncate")
    return data


def random_message(rng: random.Random) -> tuple[int, dict[str, Any]]:
    """A plausible JSON message of any kind (mostly the wrong one for where it goes)."""
    kind = rng.choice([kind for kind in KNOWN_KINDS if kind != FrameKind.BATCH])
    seq = rng.randint(1, 1000)
    bodies: dict[int, dict[str, Any]] = {
        FrameKind.HELLO: {"role": rng.choice(ROLES), "client": "fuzz"},
        FrameKind.ACCEPT: {"relay": "x", "heartbeat_interval": rng.choice([0.0, 5.0, 1e9])},
        FrameKind.REJECT: {"code": rng.choice(ERROR_CODES), "reason": "r"},
        FrameKind.CLOSE: {"code": rng.choice([*ERROR_CODES, "from_the_future"]), "reason": rand_text(rng)},
        FrameKind.HEARTBEAT: {"time": time.time()},
        FrameKind.START_STREAM: {"stream": rng.randint(0, 9), "key": rand_text(rng)},
        FrameKind.STOP_STREAM: {"stream": rng.randint(0, 9)},
        FrameKind.ADD_VIEWER: {"viewer": rng.randint(1, 99), "history": 5, "min_level": 0},
        FrameKind.REMOVE_VIEWER: {"viewer": rng.randint(1, 99)},
        FrameKind.REQUEST_SYNC: {},
        FrameKind.GOODBYE: {"reason": rand_text(rng)},
        FrameKind.SESSION_ADDED: {"session": random_session(rng, rand_uuid(rng))},
        FrameKind.SESSION_CHANGED: {"session": random_session(rng, rand_uuid(rng))},
        FrameKind.SESSION_ENDED: {"session_id": rand_uuid(rng), "reason": "session_ended"},
        FrameKind.SNAPSHOT_END: {"count": rng.randint(0, 5)},
        FrameKind.GAP: {
            "first_seq": seq,
            "last_seq": seq + rng.randint(0, 50),
            "reason": rng.choice(GAP_REASONS),
        },
        FrameKind.STREAM_END: {"code": rng.choice(ERROR_CODES), "reason": "r", "last_seq": seq},
    }
    if GET_STATS is not None:
        bodies[GET_STATS] = {"detail": rng.random() < 0.5}
        bodies[GET_STATS + 1] = {"stats": {"sessions": 1}}
    # Kinds added to the protocol after this script was written get an empty object.
    return kind, bodies.get(kind, {})


def random_frame(rng: random.Random, library: Library) -> bytes:
    r = rng.random()
    if r < 0.45:
        kind, body = random_message(rng)
        return jframe(kind, body)
    if r < 0.6:
        return frame(FrameKind.BATCH, library.random_batch(rng))
    if r < 0.8:
        return frame(rng.choice(KNOWN_KINDS), rng.randbytes(rng.randint(0, 64)))
    if r < 0.9:
        return frame(rng.choice(KNOWN_KINDS), b"")
    return frame(rng.randrange(256), rng.randbytes(rng.randint(0, 16)))


def mutation_family(op: str) -> str:
    """``json:wrong_type@.session.pid`` → ``json:wrong_type``, ``length=0`` → ``length``, …"""
    for prefix in ("insert_frame", "pad_max", "preamble", "json:extra_key", "length", "kind"):
        if op.startswith(prefix):
            return prefix
    if op.startswith("batch:"):
        return op if op in ("batch:cut", "batch:header_only") else "batch:fields"
    return op.split("@")[0].split("(")[0]


# -- the peer side of one raw connection ---------------------------------------------------------


@dataclasses.dataclass
class ConnTrace:
    """What one fuzzing connection sent (for reports and replays)."""

    port: str
    data: bytearray = dataclasses.field(default_factory=bytearray)
    outcome: str = ""


@dataclasses.dataclass
class Job:
    id: int
    kind: str
    mutations: list[str] = dataclasses.field(default_factory=list)
    endings: list[str] = dataclasses.field(default_factory=list)
    conns: list[ConnTrace] = dataclasses.field(default_factory=list)
    frames: int = 0
    #: Session ids its HELLOs named (to find jobs that raced on one session).
    session_ids: set[str] = dataclasses.field(default_factory=set)
    started: float = dataclasses.field(default_factory=time.monotonic)
    ended: float | None = None

    def note_sessions(self, hello: dict[str, Any]) -> None:
        session = hello.get("session")
        for value in (
            hello.get("session_id"),
            session.get("session_id") if isinstance(session, dict) else None,
        ):
            if isinstance(value, str):
                self.session_ids.add(value)


@dataclasses.dataclass
class StartCommand:
    stream: int
    key: str


class Peer:
    """A raw fuzzing connection: sends bytes, and parses what the relay says in a reader task."""

    def __init__(self, stream: trio.abc.Stream, trace: ConnTrace, fuzzer: Fuzzer) -> None:
        self.stream = stream
        self.trace = trace
        self.fuzzer = fuzzer
        self.decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)
        self.head = b""
        self.parse_failed = False
        self.send_broken = False
        self.closed = trio.Event()
        self._changed = trio.Event()
        self.accepted = False
        self.version: int | None = None
        self.reject: str | None = None
        self.close_code: str | None = None
        self.stream_end: str | None = None
        self.starts: list[StartCommand] = []
        self.viewer_ids: list[int] = []
        self.is_closed_by_us = False
        #: The relay closed (or reset) the connection, as opposed to us.
        self.relay_closed = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                except trio.ClosedResourceError:
                    return  # we closed it
                if not data:
                    self.relay_closed = True
                    return
                self.fuzzer.bytes_received += len(data)
                if len(self.head) < 64:
                    self.head += data[: 64 - len(self.head)]
                self._feed(data)
                self._notify()
        finally:
            self.closed.set()
            self._notify()

    def _feed(self, data: bytes | bytearray) -> None:
        if self.parse_failed:
            return
        try:
            self.decoder.receive_data(data)
            while (event := self.decoder.next_event()) is not None:
                self._on_event(event)
        except RemoteProtocolError:
            self.parse_failed = True  # e.g. the relay's HTTP 400 answer

    def _on_event(self, event: Preamble | Frame) -> None:
        if isinstance(event, Preamble):
            self.version = event.version
            return
        kind = event.kind
        if kind in (FrameKind.BATCH, FrameKind.HEARTBEAT):
            return
        try:
            obj = json.loads(event.payload)
        except ValueError:
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        if kind is FrameKind.ACCEPT:
            self.accepted = True
        elif kind is FrameKind.REJECT:
            self.reject = self.reject or str(obj.get("code"))
        elif kind is FrameKind.CLOSE:
            self.close_code = self.close_code or str(obj.get("code"))
        elif kind is FrameKind.STREAM_END:
            self.stream_end = self.stream_end or str(obj.get("code"))
        elif kind is FrameKind.START_STREAM:
            stream = obj.get("stream")
            self.starts.append(
                StartCommand(stream=stream if isinstance(stream, int) else 0, key=str(obj.get("key")))
            )
        elif kind is FrameKind.ADD_VIEWER:
            viewer = obj.get("viewer")
            self.viewer_ids.append(viewer if isinstance(viewer, int) else 0)

    async def send(self, data: bytes, rng: random.Random | None = None) -> bool:
        """Send ``data`` (in random pieces with ``rng``); False once the relay stopped taking it."""
        self.trace.data += data
        if self.send_broken or not data:
            return not self.send_broken
        pieces = [data]
        slow = False
        if rng is not None and len(data) > 1 and rng.random() < 0.35:
            cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 16))))
            pieces = [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]
            slow = rng.random() < 0.05
        try:
            for index, piece in enumerate(pieces):
                if index:
                    if slow:
                        await trio.sleep(0.005)
                    else:
                        await trio.lowlevel.checkpoint()
                await self.stream.send_all(piece)
                self.fuzzer.bytes_sent += len(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.send_broken = True
            return False
        return True

    async def wait_for(self, predicate: Callable[[], bool], seconds: float) -> bool:
        with trio.move_on_after(seconds):
            while not predicate() and not self.closed.is_set():
                await self._changed.wait()
        return predicate()

    async def wait_for_starts(self, count: int, seconds: float) -> bool:
        """Wait until ``count`` START_STREAM commands arrived."""
        return await self.wait_for(lambda: len(self.starts) >= count, seconds)

    async def wait_quiet(self) -> None:
        with trio.move_on_after(LINGER_MAX):
            while not self.closed.is_set():
                with trio.move_on_after(QUIET) as scope:
                    await self._changed.wait()
                if scope.cancelled_caught:
                    return

    async def finish(self, ending: str) -> None:
        """End our side as ``ending`` says (the caller bounds the time)."""
        if ending == "eof":
            try:
                await self.stream.send_eof()  # type: ignore[attr-defined]
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await self.closed.wait()
        elif ending == "linger":
            await self.wait_quiet()
        elif ending == "deadline":
            await self.closed.wait()
        # "abort", "reset": close at once

    async def close(self, ending: str = "abort") -> None:
        if self.is_closed_by_us:
            return
        self.is_closed_by_us = True
        if ending == "reset":
            sock = getattr(self.stream, "socket", None)
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
        await trio.aclose_forcefully(self.stream)
        self.trace.outcome = self.outcome()
        self.fuzzer.outcomes[self.trace.outcome] += 1

    def outcome(self) -> str:
        if self.head.startswith(b"HTTP/1.1 400"):
            return "http_400"
        if self.reject:
            return f"reject:{self.reject}"
        if self.close_code:
            return f"close:{self.close_code}"
        if self.stream_end:
            return f"stream_end:{self.stream_end}"
        if self.accepted:
            return "accepted, closed by relay" if self.relay_closed else "accepted, closed by us"
        if self.relay_closed:
            return "closed without a word" if not self.head else "closed after unparsed bytes"
        return "no answer before we closed"


# -- relay log capture -----------------------------------------------------------------------------


@dataclasses.dataclass
class LoggedError:
    logger: str
    message: str
    traceback: str | None
    exc_type: str | None
    exception: str | None
    location: str | None
    job: int | None
    at: float


_PORT_IN_MESSAGE: Final = re.compile(r"127\.0\.0\.1:(\d+)")


class RelayLogCatcher(logging.Handler):
    """Counts loupelive log records by level and keeps every ERROR one."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.levels: Counter[str] = Counter()
        self.errors: list[LoggedError] = []
        self.other_errors: list[LoggedError] = []
        #: Our TCP client ports → job ids (for attributing TCP connections).
        self.tcp_ports: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.verbose = False
        #: Called with the job id an ERROR record was attributed to.
        self.on_job_error: Callable[[int], None] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[f"{record.name}:{record.levelname}"] += 1
        if record.levelno < logging.ERROR:
            return
        message = record.getMessage()
        job = JOB.get()
        if job is None:
            match = _PORT_IN_MESSAGE.search(message)
            if match:
                job = self.tcp_ports.get(int(match.group(1)))
        tb = exc_type = exception = location = None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            tb = logging.Formatter().formatException(record.exc_info)
            exc_type, exception, location = describe_exception(exc)
        error = LoggedError(record.name, message, tb, exc_type, exception, location, job, time.monotonic())
        if record.name.startswith("loupelive.relay"):
            self.errors.append(error)
            if job is not None and self.on_job_error is not None:
                self.on_job_error(job)
            if self.verbose or len(self.errors) <= 3:
                print(
                    f"  relay ERROR #{len(self.errors)} (job {job}): {message}: {exception} at {location}",
                    file=sys.stderr,
                )
        else:
            self.other_errors.append(error)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _innermost_location(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "loupelive" in f.filename] or list(frames)
    if not ours:
        return "?"
    last = ours[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    """``(type, text, where)``.

    For a group: its leaves' types, and where the leaf that is not one of our
    protocol errors (the bug) was raised.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return type(exc).__name__, f"{type(exc).__name__}: {exc}", _innermost_location(exc)
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)] or _leaves(exc)
    culprit = next((leaf for leaf in leaves if not isinstance(leaf, loupelive.LoupeError)), leaves[0])
    kind = f"{type(exc).__name__}[{', '.join(sorted({type(leaf).__name__ for leaf in leaves}))}]"
    text = f"{type(exc).__name__}({'; '.join(f'{type(leaf).__name__}: {leaf}' for leaf in leaves)})"
    return kind, text, _innermost_location(culprit)


# -- the fuzzer --------------------------------------------------------------------------------------

JOB_KINDS: Final = (
    ("agent_control", 20),
    ("agent_data", 8),
    ("viewer_control", 10),
    ("viewer_data", 16),
    ("garbage", 6),
    ("stream", 30),
)

ENDINGS: Final = (("eof", 45), ("linger", 25), ("abort", 26), ("deadline", 1))


class Fuzzer:
    """Jobs and their bookkeeping; :meth:`attach` points it at a relay (again after a crash)."""

    def __init__(self, *, seed: int, target: int, tcp: bool, catcher: RelayLogCatcher) -> None:
        self.seed = seed
        self.target = target
        self.tcp = tcp
        self.catcher = catcher
        self.library = Library(random.Random(f"{seed}/library"))
        self.relay: loupelive.Relay
        self.live_session_id = ""
        self.live_last_seq: Callable[[], int] = lambda: 0
        self.connectors: dict[str, Connector] = {}
        #: Set when the relay is dying: no more jobs.
        self.stop = trio.Event()
        self.frames = 0
        self.jobs = 0
        self.connections = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.outcomes: Counter[str] = Counter()
        self.job_kinds: Counter[str] = Counter()
        self.frames_by_kind: Counter[str] = Counter()
        self.mutations: Counter[str] = Counter()
        self.endings: Counter[str] = Counter()
        self.timeouts = 0
        self.cut_by_crash = 0
        #: Exceptions in the fuzzer's own code (the first 20 kept).
        self.fuzzer_error_count = 0
        self.durations: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self.connect_seconds_max = 0.0
        self.fuzzer_errors: list[str] = []
        self.recent: collections.OrderedDict[int, Job] = collections.OrderedDict()
        #: Jobs an internal error was attributed to, and jobs that raced with them.
        self.culprits: dict[int, Job] = {}
        self.related: dict[int, list[int]] = {}
        self._job_ids = itertools.count()
        catcher.on_job_error = self.keep

    def attach(
        self, relay: loupelive.Relay, live_session_id: str, live_last_seq: Callable[[], int], stop: trio.Event
    ) -> None:
        self.relay = relay
        self.live_session_id = live_session_id
        self.live_last_seq = live_last_seq
        self.stop = stop
        self.connectors = {
            "agent": relay.memory_connector("agent"),
            "viewer": relay.memory_connector("viewer"),
        }

    def keep(self, job_id: int) -> None:
        """Keep a job an internal error was attributed to, and the jobs that touched its sessions then."""
        job = self.recent.get(job_id)
        if job is None or job_id in self.culprits:
            return
        self.culprits[job_id] = job
        now = time.monotonic()
        related = []
        for other in self.recent.values():
            if (
                other is not job
                and other.session_ids & job.session_ids
                and other.started <= now
                and (other.ended is None or other.ended >= job.started - 1.0)
            ):
                related.append(other.id)
                self.culprits.setdefault(other.id, other)
        self.related[job_id] = related[-10:]

    def find_job(self, job_id: int) -> Job | None:
        return self.culprits.get(job_id) or self.recent.get(job_id)

    # -- connections --

    async def open_peer(self, port: Port, job: Job) -> Peer:
        if self.tcp:
            number = self.relay.agent_port if port == "agent" else self.relay.viewer_port
            before = time.monotonic()
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", number)
            self.connect_seconds_max = max(self.connect_seconds_max, time.monotonic() - before)
            local_port = stream.socket.getsockname()[1]  # type: ignore[attr-defined]
            ports = self.catcher.tcp_ports
            ports[local_port] = job.id
            ports.move_to_end(local_port)
            while len(ports) > 20_000:
                ports.popitem(last=False)
        else:
            stream = await self.connectors[port]("relay", 0)
        self.connections += 1
        trace = ConnTrace(port)
        job.conns.append(trace)
        return Peer(stream, trace, self)

    def count_frames(self, job: Job, count: int) -> None:
        job.frames += count
        self.frames += count
        self.frames_by_kind[job.kind] += count

    # -- the loop --

    async def worker(self) -> None:
        while self.frames < self.target and not self.stop.is_set():
            await self.run_job(next(self._job_ids))

    async def run_job(self, job_id: int, *, replay: ConnTrace | None = None) -> Job:
        rng = random.Random(f"{self.seed}/{job_id}")
        kind = "replay" if replay is not None else _pick(rng, JOB_KINDS)
        job = Job(job_id, kind)
        self.jobs += 1
        self.job_kinds[kind] += 1
        self.recent[job_id] = job
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)
        token = JOB.set(job_id)
        peers: list[Peer] = []
        try:
            bound = STREAM_JOB_BOUND if kind == "stream" else CONNECTION_BOUND
            with trio.move_on_after(bound) as scope:
                if replay is not None:
                    await self.replay_job(job, replay, peers)
                elif kind == "stream":
                    await self.stream_job(job, rng, peers)
                else:
                    await self.single_job(job, rng, peers)
            if scope.cancelled_caught:
                self.timeouts += 1
        except Exception as exc:
            if self.stop.is_set():
                # The relay died under this job (e.g. its memory connector's
                # nursery is closed): the crash is reported, not this.
                self.cut_by_crash += 1
            else:
                self.fuzzer_error_count += 1
                if len(self.fuzzer_errors) < 20:
                    self.fuzzer_errors.append(
                        f"job {job_id} ({kind}): " + "".join(traceback.format_exception(exc))
                    )
        finally:
            JOB.reset(token)
            for peer in peers:
                await peer.close()
        job.ended = time.monotonic()
        self.durations[kind].append(job.ended - job.started)
        for op in job.mutations:
            self.mutations[mutation_family(op)] += 1
        for ending in job.endings:
            self.endings[ending] += 1
        return job

    async def _talk(
        self, peer: Peer, data: bytes, frames: int, job: Job, rng: random.Random, ending: str
    ) -> None:
        """Send, end as ``ending`` says, while a reader collects the relay's answer."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.read)
            self.count_frames(job, frames)
            await peer.send(data, rng)
            await peer.finish(ending)
            nursery.cancel_scope.cancel()
        await peer.close(ending)

    def _ending(self, rng: random.Random) -> str:
        ending = _pick(rng, ENDINGS)
        if ending == "abort" and self.tcp and rng.random() < 0.5:
            ending = "reset"
        return ending

    # -- single-connection jobs --

    async def single_job(self, job: Job, rng: random.Random, peers: list[Peer]) -> None:
        if job.kind == "garbage":
            port: Port = rng.choice(["agent", "viewer"])
            data = self.garbage(rng, job.mutations)
            frames = 1
        else:
            port, hello, followups = self.build(job.kind, rng)
            job.note_sessions(hello)
            if rng.random() < 0.03:
                port = "viewer" if port == "agent" else "agent"
                job.mutations.append("wrong_port")
            if rng.random() < 0.3:
                # The HELLO's JSON mutated; sometimes bytes too.
                hello_frame = frame(FrameKind.HELLO, mutate_json(rng, hello, job.mutations))
                wire = Wire(encode_preamble(), [hello_frame, *followups])
                scope = rng.choices(["none", "followups", "hello", "all"], [50, 30, 10, 10])[0]
            else:
                wire = Wire(encode_preamble(), [jframe(FrameKind.HELLO, hello), *followups])
                scope = _pick(rng, SCOPES)
            data = mutate_wire(rng, wire, job.mutations, self.library, scope=scope)
            frames = len(wire.frames)
        ending = self._ending(rng)
        job.endings.append(ending)
        peer = await self.open_peer(port, job)
        peers.append(peer)
        await self._talk(peer, data, frames, job, rng, ending)

    async def replay_job(self, job: Job, trace: ConnTrace, peers: list[Peer]) -> None:
        peer = await self.open_peer("agent" if trace.port == "agent" else "viewer", job)
        peers.append(peer)
        await self._talk(peer, bytes(trace.data), 0, job, random.Random(0), "eof")

    def garbage(self, rng: random.Random, ops: list[str]) -> bytes:
        hello = jframe(FrameKind.HELLO, {"role": "viewer_control"})
        options: list[tuple[str, Callable[[], bytes]]] = [
            ("random_bytes", lambda: rng.randbytes(rng.randint(1, 2000))),
            (
                "http",
                lambda: rng.choice(
                    [
                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /x HTTP/1.0\r\n\r\n",
                        b"GE",
                        b"get / HTTP/1.1\r\n\r\n",
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                        b"OPTIONS",
                    ]
                ),
            ),
            ("tls", lambda: bytes.fromhex("16030100a5010000a10303") + rng.randbytes(64)),
            ("wrong_version", lambda: MAGIC + struct.pack(">H", rng.choice([0, 2, 65535])) + hello),
            ("partial_magic", lambda: MAGIC[: rng.randint(1, 7)]),
            ("bare_preamble", lambda: encode_preamble()),
            ("partial_header", lambda: encode_preamble() + hello[: rng.randint(1, 4)]),
            ("nothing", lambda: b""),
            ("magic_then_junk", lambda: MAGIC + rng.randbytes(rng.randint(0, 100))),
            ("line_ending_mangled", lambda: MAGIC.replace(b"\r\n", b"\n") + b"\x00\x01" + hello),
            ("zeros", lambda: bytes(rng.randint(1, 100))),
        ]
        name, make = rng.choice(options)
        ops.append(f"garbage:{name}")
        return make()

    def build(self, kind: str, rng: random.Random) -> tuple[Port, dict[str, Any], list[bytes]]:
        """A valid HELLO for ``kind`` (as a dict) and its follow-up frames."""
        if kind == "agent_control":
            return "agent", self.agent_control_hello(rng), self.followups(rng, "agent_control")
        if kind == "agent_data":
            return "agent", self.agent_data_hello(rng), self.followups(rng, "agent_data")
        if kind == "viewer_control":
            hello: dict[str, Any] = {"role": "viewer_control", "client": "fuzz/1"}
            if rng.random() < 0.05:
                hello["token"] = rand_text(rng)
            return "viewer", hello, self.followups(rng, "viewer_control")
        return "viewer", self.viewer_data_hello(rng), self.followups(rng, "viewer_data")

    def agent_control_hello(self, rng: random.Random) -> dict[str, Any]:
        r = rng.random()
        secret: str | None
        if r < 0.55:
            index = rng.randrange(POOL_SIZE)
            session_id = pool_id(index)
            secret = rng.choices([pool_secret(index), None, rand_text(rng, 1, 30)], [70, 15, 15])[0]
        elif r < 0.65:
            session_id, secret = self.live_session_id, rng.choice([None, "", rand_text(rng, 1, 30)])
        elif r < 0.9:
            session_id, secret = rand_uuid(rng), rand_text(rng, 8, 30)
        else:
            session_id, secret = odd_session_id(rng), None
        hello: dict[str, Any] = {
            "role": "agent_control",
            "client": "fuzz/1",
            "session": random_session(rng, session_id),
        }
        if secret is not None:
            hello["secret"] = secret
        if rng.random() < 0.05:
            hello["token"] = rand_text(rng)
        return hello

    def _some_session_id(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.5:
            return self.live_session_id
        if r < 0.75:
            return pool_id(rng.randrange(POOL_SIZE))
        if r < 0.9:
            return rand_uuid(rng)
        return odd_session_id(rng)

    def agent_data_hello(self, rng: random.Random) -> dict[str, Any]:
        session_id = self._some_session_id(rng)
        session = self.relay.sessions.get(session_id)
        real = session.stream_no if session is not None else 1
        hello: dict[str, Any] = {
            "role": "agent_data",
            "client": "fuzz/1",
            "session_id": session_id,
            "stream": rng.choice([real, real, real + 1, max(real - 1, 0), 0, rng.randrange(2**32)]),
        }
        key = rng.choices([None, "", rand_text(rng, 1, 30), "A" * 24], [20, 10, 60, 10])[0]
        if key is not None:
            hello["key"] = key
        return hello

    def viewer_data_hello(self, rng: random.Random) -> dict[str, Any]:
        session_id = self._some_session_id(rng)
        hello: dict[str, Any] = {
            "role": "viewer_data",
            "client": "fuzz/1",
            "session_id": session_id,
            "history": rng.choices([0, rng.randint(1, 50), 1000, 10**6], [50, 38, 10, 2])[0],
            "min_level": rng.choice([0, 0, 10, 20, 30, 40, 50, 255]),
        }
        r = rng.random()
        if r < 0.25:
            hello["after_seq"] = max(self.live_last_seq() - rng.randint(0, 200), 0)
        elif r < 0.3:
            hello["after_seq"] = rng.choice([2**64 - 1, 10**9])
        elif r < 0.31:
            hello["after_seq"] = 0
        return hello

    def followups(self, rng: random.Random, role: str) -> list[bytes]:
        r = rng.random()
        count = 0 if r < 0.15 else rng.randint(1, 5) if r < 0.65 else rng.randint(6, 20)
        out: list[bytes] = []
        for _ in range(count):
            out.append(self.followup(rng, role))
        if rng.random() < 0.03:
            out.extend([jframe(FrameKind.HEARTBEAT, {"time": time.time()})] * rng.randint(20, 200))
        return out

    def followup(self, rng: random.Random, role: str) -> bytes:
        valid: list[tuple[str, int]]
        if role == "agent_control":
            valid = [
                ("heartbeat", 55),
                ("goodbye", 8),
                ("close", 5),
                ("message", 20),
                ("batch", 5),
                ("bytes", 7),
            ]
        elif role == "agent_data":
            valid = [
                ("batch", 45),
                ("gap", 15),
                ("stream_end", 8),
                ("heartbeat", 17),
                ("message", 10),
                ("bytes", 5),
            ]
        elif role == "viewer_control" and GET_STATS is not None:
            valid = [("heartbeat", 50), ("get_stats", 12), ("close", 8), ("message", 23), ("bytes", 7)]
        else:
            valid = [("heartbeat", 60), ("close", 8), ("message", 25), ("bytes", 7)]
        what = rng.choices([name for name, _ in valid], [weight for _, weight in valid])[0]
        if what == "batch":
            return frame(FrameKind.BATCH, self.library.random_batch(rng))
        if what == "bytes":
            return frame(rng.randrange(256), rng.randbytes(rng.randint(0, 64)))
        bodies: dict[str, tuple[int, dict[str, Any]]] = {
            "heartbeat": (FrameKind.HEARTBEAT, {"time": time.time()}),
            "goodbye": (FrameKind.GOODBYE, {"reason": rand_text(rng)}),
            "close": (FrameKind.CLOSE, {"code": rng.choice(ERROR_CODES), "reason": rand_text(rng)}),
            "gap": (FrameKind.GAP, self.gap_body(rng, 0)),
            "stream_end": (FrameKind.STREAM_END, self.stream_end_body(rng)),
            "get_stats": (GET_STATS or 0, {"detail": rng.random() < 0.5}),
        }
        kind, body = bodies.get(what) or random_message(rng)
        if rng.random() < 0.08:
            ops: list[str] = []
            return frame(kind, mutate_json(rng, body, ops))
        return jframe(kind, body)

    @staticmethod
    def gap_body(rng: random.Random, viewer: int) -> dict[str, Any]:
        first = rng.choice([1, rng.randint(1, 10**6), 2**64 - 1])
        body: dict[str, Any] = {
            "first_seq": first,
            "last_seq": min(first + rng.randint(0, 100), 2**64 - 1),
            "reason": rng.choice(GAP_REASONS),
        }
        if viewer or rng.random() < 0.2:
            body["viewer"] = viewer or rng.randint(1, 10**6)
        return body

    @staticmethod
    def stream_end_body(rng: random.Random) -> dict[str, Any]:
        code = rng.choices(
            ["stopped", "session_ended", rng.choice(ERROR_CODES), "from_the_future"], [50, 20, 20, 10]
        )[0]
        return {"code": code, "reason": rand_text(rng), "last_seq": rng.randint(0, 10**6)}

    # -- the data path: a session of our own --

    async def stream_job(self, job: Job, rng: random.Random, peers: list[Peer]) -> None:
        if rng.random() < 0.25:
            index = rng.randrange(POOL_SIZE)
            session_id, secret = pool_id(index), pool_secret(index)
        else:
            session_id, secret = rand_uuid(rng), rand_text(rng, 16, 32)
        job.session_ids.add(session_id)
        control_hello = {
            "role": "agent_control",
            "client": "fuzz-stream/1",
            "session": random_session(rng, session_id) | {"tags": {"fuzz": "stream"}},
            "secret": secret,
        }
        async with trio.open_nursery() as nursery:

            async def connect(port: Port) -> Peer:
                peer = await self.open_peer(port, job)
                peers.append(peer)
                nursery.start_soon(peer.read)
                return peer

            control = await connect("agent")
            self.count_frames(job, 1)
            await control.send(encode_preamble() + jframe(FrameKind.HELLO, control_hello))
            if not await control.wait_for(lambda: control.accepted, ANSWER_WAIT):
                nursery.cancel_scope.cancel()
                return
            viewers: list[Peer] = []
            for _ in range(1 if rng.random() < 0.8 else 2):
                viewer = await connect("viewer")
                viewers.append(viewer)
                hello: dict[str, Any] = {
                    "role": "viewer_data",
                    "client": "fuzz-stream/1",
                    "session_id": session_id,
                    "history": rng.choice([0, 0, 5, 100]),
                    "min_level": rng.choice([0, 0, 20, 40]),
                }
                if rng.random() < 0.3:
                    hello["after_seq"] = rng.choice([0, 1, 10, 10**6])
                self.count_frames(job, 1)
                await viewer.send(encode_preamble() + jframe(FrameKind.HELLO, hello))
            seen = 0
            for round_no in range(2 if rng.random() < 0.35 else 1):
                # The relay restarts a stream only if the first one ended early.
                if not await control.wait_for_starts(seen + 1, ANSWER_WAIT if round_no == 0 else 0.5):
                    job.mutations.append("no_start_stream")
                    break
                seen = len(control.starts)
                start = control.starts[-1]
                data_peer = await connect("agent")
                data_hello = {
                    "role": "agent_data",
                    "client": "fuzz-stream/1",
                    "session_id": session_id,
                    "stream": start.stream,
                    "key": start.key,
                }
                wire = Wire(
                    encode_preamble(),
                    [
                        jframe(FrameKind.HELLO, data_hello),
                        *self.data_followups(rng, control.viewer_ids, job.mutations),
                    ],
                )
                scope = rng.choices(["followups", "hello", "none"], [80, 5, 15])[0]
                payload = mutate_wire(rng, wire, job.mutations, self.library, scope=scope)
                self.count_frames(job, len(wire.frames))
                await data_peer.send(payload, rng)
                ending = rng.choices(["eof", "abort", "linger"], [40, 30, 30])[0]
                job.endings.append(f"data:{ending}")
                await data_peer.finish(ending)
                await data_peer.close(ending)
            if viewers and rng.random() < 0.15:
                junk = Wire(b"", [self.followup(rng, "viewer_data") for _ in range(rng.randint(1, 5))])
                self.count_frames(job, len(junk.frames))
                await viewers[0].send(mutate_wire(rng, junk, job.mutations, self.library, scope="all"))
            if await self.end_session(job, rng, control, control_hello, connect):
                # The session ended: give the viewers a moment for the end of their streams.
                with trio.move_on_after(0.3):
                    for viewer in viewers:
                        await viewer.closed.wait()
            nursery.cancel_scope.cancel()

    async def end_session(
        self,
        job: Job,
        rng: random.Random,
        control: Peer,
        control_hello: dict[str, Any],
        connect: Callable[[Port], Any],
    ) -> bool:
        """End our session: GOODBYE, a lost connection, or a takeover and GOODBYE.  True if it ended."""
        r = rng.random()
        goodbye = jframe(FrameKind.GOODBYE, {"reason": "fuzz done"})
        if r < 0.6:
            job.endings.append("session:goodbye")
            self.count_frames(job, 1)
            await control.send(goodbye)
            # After a GOODBYE the relay may wait up to end_flush_timeout (10 s)
            # for a stream it asked for and we never open: do not wait for it.
            with trio.move_on_after(GOODBYE_WAIT):
                await control.finish("eof")
            return True
        if r < 0.8:
            job.endings.append("session:lost")
            await control.close(rng.choice(["abort", "reset"]) if self.tcp else "abort")
            return False
        job.endings.append("session:takeover")
        successor: Peer = await connect("agent")
        self.count_frames(job, 1)
        await successor.send(encode_preamble() + jframe(FrameKind.HELLO, control_hello))
        if not await successor.wait_for(lambda: successor.accepted, ANSWER_WAIT):
            return False
        await control.wait_for(lambda: control.close_code is not None, 0.5)
        self.count_frames(job, 1)
        await successor.send(goodbye)
        with trio.move_on_after(GOODBYE_WAIT):
            await successor.finish("eof")
        return True

    def data_followups(self, rng: random.Random, viewer_ids: list[int], ops: list[str]) -> list[bytes]:
        library = self.library
        story = rng.choice(library.stories)
        frames: list[bytes] = []
        targets = list(viewer_ids)
        if rng.random() < 0.15:
            targets.append(rng.choice([0, 10**6, 2**32 - 1]))
        for viewer in targets:
            if rng.random() < 0.8:
                if rng.random() < 0.2:
                    frames.append(
                        jframe(FrameKind.GAP, self.gap_body(rng, viewer) | {"reason": "history_unavailable"})
                    )
                history_story = story if rng.random() < 0.8 else rng.choice(library.stories)
                frames.extend(library.history_for(history_story, viewer))
        live = story.live[: rng.randint(1, len(story.live))]
        for payload in live:
            frames.append(frame(FrameKind.BATCH, payload))
            r = rng.random()
            if r < 0.08:
                frames.append(jframe(FrameKind.GAP, self.gap_body(rng, 0)))
            elif r < 0.12:
                frames.append(jframe(FrameKind.HEARTBEAT, {"time": time.time()}))
            elif r < 0.14:
                frames.append(frame(FrameKind.BATCH, library.random_batch(rng)))
        if rng.random() < 0.5:
            frames.append(jframe(FrameKind.STREAM_END, self.stream_end_body(rng)))
        for index, data in enumerate(frames):
            if data[4] in (FrameKind.GAP, FrameKind.STREAM_END) and rng.random() < 0.1:
                frames[index] = frame(data[4], mutate_json(rng, json.loads(data[5:]), ops))
        return frames


# -- reports -----------------------------------------------------------------------------------------


def _preview(payload: bytes, kind: int) -> str:
    if kind == FrameKind.BATCH:
        text = payload[:24].hex()
        return text + ("…" if len(payload) > 24 else "")
    text = payload[:240].decode("utf-8", "backslashreplace")
    return repr(text) + ("…" if len(payload) > 240 else "")


def describe_input(data: bytes, limit: int = 30) -> list[str]:
    """The frames of what a connection sent, read leniently."""
    lines: list[str] = []
    pos = 0
    if len(data) >= 10 and data[:8] == MAGIC:
        lines.append(f"preamble (version {struct.unpack_from('>H', data, 8)[0]})")
        pos = 10
    else:
        return [f"raw bytes ({len(data)}): {data[:200]!r}{'…' if len(data) > 200 else ''}"]
    while pos < len(data) and len(lines) < limit:
        if len(data) - pos < HEADER.size:
            lines.append(f"partial frame header {data[pos:]!r}")
            return lines
        length, kind = HEADER.unpack_from(data, pos)
        name = FrameKind(kind).name if kind in KNOWN_KINDS else f"kind {kind}"
        payload = data[pos + HEADER.size : pos + HEADER.size + length]
        short = "" if len(payload) == length else f", only {len(payload)} follow"
        lines.append(f"{name} (length {length}{short}): {_preview(payload, kind)}")
        pos += HEADER.size + length
    if pos < len(data):
        lines.append(f"… {len(data) - pos} more bytes")
    return lines


def job_report(job: Job) -> dict[str, Any]:
    return {
        "job": job.id,
        "kind": job.kind,
        "sessions": sorted(job.session_ids),
        "mutations": job.mutations,
        "endings": job.endings,
        "connections": [
            {
                "port": trace.port,
                "bytes": len(trace.data),
                "outcome": trace.outcome,
                "frames": describe_input(bytes(trace.data)),
                "hex": bytes(trace.data).hex() if len(trace.data) <= 4096 else None,
            }
            for trace in job.conns
        ],
    }


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def open_connections(relay: loupelive.Relay) -> int | None:
    """All connections the relay has open, handshakes included (private counter if not in statistics)."""
    count = getattr(relay.statistics(), "connections", None)
    if count is None:
        count = getattr(relay, "_connections", None)
    return count if isinstance(count, int) else None


def stats_json(relay: loupelive.Relay) -> dict[str, Any]:
    stats = relay.statistics().to_json()
    stats.pop("session_details", None)
    stats["open_connections"] = open_connections(relay)
    return stats


def relay_task_dump(relay: loupelive.Relay) -> list[str]:
    """Where the relay's remaining tasks wait (for a leak report)."""
    lines: list[str] = []
    nursery = getattr(relay, "_nursery", None)
    if nursery is None:
        return lines

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        where = ""
        frames = list(task.iter_await_frames())
        if frames:
            code = frames[-1][0].f_code
            where = f" at {Path(code.co_filename).name}:{frames[-1][1]} in {code.co_name}"
        if len(lines) < 200:
            lines.append("  " * depth + f"{task.name}{where}")
        for child in task.child_nurseries:
            for grandchild in child.child_tasks:
                walk(grandchild, depth + 1)

    for task in nursery.child_tasks:
        walk(task, 0)
    return lines


# -- the run -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Steady:
    """The well-behaved session's bookkeeping."""

    logged: int = 0
    items: list[Record | loupelive.Gap] = dataclasses.field(default_factory=list)
    ended: bool = False
    max_lag: int = 0
    error: str | None = None


async def steady_log(agent: loupelive.Agent, steady: Steady, stop: trio.Event) -> None:
    while not stop.is_set():
        for _ in range(STEADY_RECORDS):
            expected = steady.logged + 1
            seq = agent.log(
                Level.INFO if expected % 7 else Level.WARNING,
                f"steady {expected} ✓",
                logger="fuzz.steady",
                fields={"n": expected} if expected % 3 == 0 else None,
            )
            if seq != expected:
                steady.error = f"agent.log returned seq {seq}, expected {expected}"
            steady.logged = expected
        steady.max_lag = max(steady.max_lag, steady.logged - len(steady.items))
        await trio.sleep(STEADY_TICK)


async def steady_consume(stream: loupelive.Stream, steady: Steady) -> None:
    count = 0
    async for item in stream:
        steady.items.append(item)
        count += 1
        if count % 100 == 0:
            await trio.lowlevel.checkpoint()
    steady.ended = True


def check_steady(steady: Steady) -> Check:
    items = steady.items
    gaps = [item for item in items if isinstance(item, loupelive.Gap)]
    records = [item for item in items if isinstance(item, Record)]
    seqs = [record.seq for record in records]
    expected = list(range(1, steady.logged + 1))
    if steady.error:
        return Check("well_behaved_stream", False, steady.error)
    if gaps or seqs != expected:
        first_bad = next((i for i, (a, b) in enumerate(zip(seqs, expected, strict=False)) if a != b), None)
        return Check(
            "well_behaved_stream",
            False,
            f"{len(records)} records, {len(gaps)} gaps {[(g.first_seq, g.last_seq, g.reason) for g in gaps[:5]]}; "
            f"logged {steady.logged}; first mismatch at index {first_bad}; "
            f"duplicates {len(seqs) - len(set(seqs))}",
        )
    wrong = [r.seq for r in records if r.message != f"steady {r.seq} ✓"]
    if wrong:
        return Check("well_behaved_stream", False, f"wrong message text at seqs {wrong[:10]}")
    return Check(
        "well_behaved_stream",
        True,
        f"all {steady.logged} records exactly once, in order, no gaps (max lag {steady.max_lag} records)",
    )


async def poll(predicate: Callable[[], bool], seconds: float, interval: float = 0.1) -> bool:
    for _ in range(max(int(seconds / interval), 1)):
        if predicate():
            return True
        await trio.sleep(interval)
    return predicate()


async def check_new_session(open_agent: Callable[..., Any], open_viewer: Callable[..., Any]) -> Check:
    name = "relay_serves_new_session"
    try:
        with trio.move_on_after(20) as scope:
            async with (
                open_agent(app="after-the-fuzz") as agent,
                open_viewer() as viewer,
                viewer.open_stream(agent.session_id, after_seq=0) as stream,
            ):
                agent.log(Level.WARNING, "after the storm", fields={"k": "v"})
                item = await anext(stream)
        if scope.cancelled_caught:
            return Check(name, False, "no record within 20 s")
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}")
    ok = isinstance(item, Record) and item.seq == 1 and item.message == "after the storm"
    return Check(name, ok, "a new agent and viewer exchanged a record" if ok else f"got {item!r}")


def counts(relay: loupelive.Relay) -> dict[str, Any]:
    stats = relay.statistics()
    return {
        "sessions": sorted(relay.sessions),
        "agent_connections": stats.agent_connections,
        "agent_data_connections": stats.agent_data_connections,
        "viewer_connections": stats.viewer_connections,
        "viewer_streams": stats.viewer_streams,
        "queued_bytes": stats.queued_bytes,
        "open_connections": open_connections(relay),
    }


class RelayGuard:
    """Notices the relay dying and keeps what killed it.

    A relay dies when an exception escapes a connection handler: its nursery is
    cancelled (every connection goes) and ``serve_relay`` raises once the last
    task ended.  With memory streams the handlers the connectors start are
    wrapped, so the escaping exception and the job it served are known at
    once; over TCP the handlers belong to ``trio.serve_listeners``, so a watcher
    notices the relay's nursery being cancelled, and the job is found from the
    ``peer`` in the traceback.
    """

    def __init__(self) -> None:
        self.dying = trio.Event()
        self.ended = trio.Event()
        #: Exceptions that escaped a connection handler, with the job it served.
        self.escaped: list[tuple[int | None, BaseException]] = []
        #: What ``serve_relay`` raised.
        self.crash: BaseException | None = None

    def wrap(self, handler: Callable[[trio.abc.Stream], Any]) -> Callable[[trio.abc.Stream], Any]:
        async def guarded(stream: trio.abc.Stream) -> None:
            try:
                await handler(stream)
            except Exception as exc:
                self.escaped.append((JOB.get(), exc))
                self.dying.set()
                raise

        return guarded

    async def serve(self, config: RelayConfig, *, task_status: trio.TaskStatus[loupelive.Relay]) -> None:
        try:
            await loupelive.serve_relay(config, task_status=task_status)
        except Exception as exc:
            self.crash = exc
            self.dying.set()
        finally:
            self.ended.set()

    async def watch(self, relay: loupelive.Relay) -> None:
        nursery = getattr(relay, "_nursery", None)
        while nursery is not None and not self.dying.is_set():
            if nursery.cancel_scope.cancel_called:
                self.dying.set()
                return
            with trio.move_on_after(0.1):
                await self.dying.wait()

    def killer(self, tcp_ports: dict[int, int]) -> tuple[int | None, BaseException | None]:
        """The job that killed the relay (if known) and the exception."""
        if self.escaped:
            return self.escaped[0]
        if self.crash is None:
            return None, None
        for leaf in _leaves(self.crash):
            tb = leaf.__traceback__
            while tb is not None:
                peer = tb.tb_frame.f_locals.get("peer")
                match = _PORT_IN_MESSAGE.search(peer) if isinstance(peer, str) else None
                if match:
                    return tcp_ports.get(int(match.group(1))), self.crash
                tb = tb.tb_next
        return None, self.crash


async def run(args: argparse.Namespace, results: dict[str, Any], catcher: RelayLogCatcher) -> None:
    config = RelayConfig(
        host="127.0.0.1",
        agent_port=0,
        viewer_port=0,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        auth_failures_before_delay=10**9,
    )
    results["relay_config"] = {
        "handshake_timeout": config.handshake_timeout,
        "heartbeat_interval": config.heartbeat_interval,
        "heartbeat_timeout": config.heartbeat_timeout,
        "agent_grace": config.agent_grace,
        "stream_grace": config.stream_grace,
        "auth_failures_before_delay": config.auth_failures_before_delay,
        "other settings": "defaults",
    }
    checks: list[Check] = results["checks_raw"]
    fuzzer = Fuzzer(seed=args.seed, target=args.frames, tcp=args.tcp, catcher=catcher)
    results["fuzzer"] = fuzzer
    crashes: list[dict[str, Any]] = results["crashes"]
    rejected: Counter[str] = Counter()
    print(
        f"fuzzing {'TCP loopback' if args.tcp else 'in-memory'} connections to the relay: "
        f"{args.frames:,} frames, {args.concurrency} at a time, seed {args.seed}",
        flush=True,
    )
    while True:
        guard = RelayGuard()
        async with trio.open_nursery() as root:
            relay: loupelive.Relay = await root.start(guard.serve, config)
            # Memory connectors start these (looked up when a connector is made).
            relay.handle_agent_connection = guard.wrap(relay.handle_agent_connection)  # type: ignore[method-assign,assignment]
            relay.handle_viewer_connection = guard.wrap(relay.handle_viewer_connection)  # type: ignore[method-assign,assignment]
            root.start_soon(guard.watch, relay)
            try:
                await fuzz_beside_a_session(args, relay, guard, fuzzer, results, catcher, checks)
                if guard.dying.is_set():
                    # serve_relay raises once its last task has ended.
                    with trio.move_on_after(15):
                        await guard.ended.wait()
            finally:
                rejected.update(relay.statistics().rejected)
                root.cancel_scope.cancel()
        if not guard.dying.is_set():
            break
        crashes.append(await crash_report(guard, fuzzer, catcher, config, args.tcp))
        if fuzzer.frames >= args.frames or len(crashes) >= MAX_RELAY_LIVES:
            break
        print(f"restarting the relay (crash {len(crashes)}) and fuzzing on", flush=True)
    results["rejected"] = dict(rejected.most_common())
    checks.append(
        Check(
            "relay_alive",
            not crashes,
            f"the relay died {len(crashes)} time(s): "
            + "; ".join(sorted({f"{c['exception']} at {c['location']}" for c in crashes}))
            if crashes
            else "serve_relay kept running",
        )
    )


async def crash_report(
    guard: RelayGuard, fuzzer: Fuzzer, catcher: RelayLogCatcher, config: RelayConfig, tcp: bool
) -> dict[str, Any]:
    job_id, exc = guard.killer(catcher.tcp_ports)
    job = fuzzer.find_job(job_id) if job_id is not None else None
    kind, text, location = describe_exception(exc) if exc is not None else (None, None, None)
    crash: dict[str, Any] = {
        "exception_type": kind,
        "exception": text,
        "location": location,
        "traceback": "".join(traceback.format_exception(exc))
        if exc is not None
        else "the relay's nursery was cancelled",
        "job": job_id,
        "input": job_report(job) if job is not None else None,
        "reproduced_on_a_fresh_relay": None,
    }
    if job is not None and len(job.conns) == 1:
        crash["reproduced_on_a_fresh_relay"] = await kills_a_fresh_relay(config, job.conns[0], tcp)
    print(
        f"  RELAY CRASH: {text} at {location} (job {job_id}); "
        f"its input alone kills a fresh relay: {crash['reproduced_on_a_fresh_relay']}",
        flush=True,
    )
    return crash


async def kills_a_fresh_relay(config: RelayConfig, trace: ConnTrace, tcp: bool) -> bool:
    """Send one connection's bytes to a new relay: does it die?"""
    guard = RelayGuard()
    async with trio.open_nursery() as nursery:
        relay: loupelive.Relay = await nursery.start(guard.serve, config)
        with trio.move_on_after(5):
            if tcp:
                number = relay.agent_port if trace.port == "agent" else relay.viewer_port
                stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", number)
            else:
                stream = await relay.memory_connector("agent" if trace.port == "agent" else "viewer")(
                    "relay", 0
                )
            try:
                with trio.move_on_after(2):
                    await stream.send_all(bytes(trace.data))
                    await stream.send_eof()  # type: ignore[attr-defined]
                    while await stream.receive_some(65536):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await trio.aclose_forcefully(stream)
            with trio.move_on_after(2):
                await guard.dying.wait()
        nursery.cancel_scope.cancel()
    return guard.dying.is_set() and guard.crash is not None


async def fuzz_beside_a_session(
    args: argparse.Namespace,
    relay: loupelive.Relay,
    guard: RelayGuard,
    fuzzer: Fuzzer,
    results: dict[str, Any],
    catcher: RelayLogCatcher,
    checks: list[Check],
) -> None:
    """One life of the relay: a well-behaved session, fuzzing beside it, then the checks.

    If the relay dies, fuzzing stops and nothing is checked: :func:`run` starts
    another relay and fuzzes on.
    """
    if args.tcp:
        agent_kw: dict[str, Any] = {"host": "127.0.0.1", "port": relay.agent_port}
        viewer_kw: dict[str, Any] = {"host": "127.0.0.1", "port": relay.viewer_port}
    else:
        agent_kw = {"host": "relay", "port": 0, "connector": relay.memory_connector("agent")}
        viewer_kw = {"host": "relay", "port": 0, "connector": relay.memory_connector("viewer")}

    def open_agent(**kw: Any) -> Any:
        return loupelive.open_agent(**agent_kw, **kw)

    def open_viewer(**kw: Any) -> Any:
        return loupelive.open_viewer(**viewer_kw, **kw)

    steady = Steady()
    live_id = ""
    try:
        async with (
            open_agent(app="well-behaved", buffer_records=10_000_000, buffer_bytes=2**31) as agent,
            open_viewer() as viewer,
            viewer.open_stream(agent.session_id, after_seq=0) as stream,
            trio.open_nursery() as steady_nursery,
        ):
            live_id = agent.session_id
            stop = trio.Event()
            steady_nursery.start_soon(steady_consume, stream, steady)
            steady_nursery.start_soon(steady_log, agent, steady, stop)
            fuzzer.attach(relay, live_id, lambda: steady.logged, guard.dying)
            await run_fuzzer(args, fuzzer, relay, catcher, results)
            if not guard.dying.is_set():
                print("fuzzing done; checking the relay", flush=True)
                await check_after_fuzzing(
                    relay, fuzzer, catcher, steady, stop, live_id, results, checks, open_agent, open_viewer
                )
            steady_nursery.cancel_scope.cancel()
    except Exception as exc:
        if guard.dying.is_set():
            return  # the well-behaved clients lost their relay
        checks.append(Check("well_behaved_clients", False, "".join(traceback.format_exception(exc))[-3000:]))
    if guard.dying.is_set():
        return
    results["well_behaved"] = {
        "session_id": live_id,
        "records_logged": steady.logged,
        "records_received": len(steady.items),
        "max_lag_records": steady.max_lag,
    }
    zero = {
        "sessions": [],
        "agent_connections": 0,
        "agent_data_connections": 0,
        "viewer_connections": 0,
        "viewer_streams": 0,
        "queued_bytes": 0,
        "open_connections": 0,
    }
    closed = await poll(lambda: counts(relay) == zero, 30, 0.1)
    now = counts(relay)
    checks.append(
        Check("nothing_left_after_close", closed, f"{now}" if closed else f"expected {zero}, have {now}")
    )
    if not closed:
        results["relay_tasks_after_close"] = relay_task_dump(relay)
    results["relay_statistics"] = stats_json(relay)


async def run_fuzzer(
    args: argparse.Namespace,
    fuzzer: Fuzzer,
    relay: loupelive.Relay,
    catcher: RelayLogCatcher,
    results: dict[str, Any],
) -> None:
    started = time.monotonic()
    cpu_started = time.process_time()
    frames_before = fuzzer.frames
    seconds_before = results.get("fuzz_seconds", 0.0)
    done = trio.Event()

    async def progress() -> None:
        while not done.is_set():
            with trio.move_on_after(5):
                await done.wait()
            elapsed = time.monotonic() - started
            print(
                f"  {seconds_before + elapsed:6.1f} s: {fuzzer.frames:,} frames, {fuzzer.connections:,} connections, "
                f"{(fuzzer.frames - frames_before) / max(elapsed, 1e-9):,.0f} frames/s, "
                f"{len(catcher.errors)} relay errors, {len(relay.sessions)} sessions",
                flush=True,
            )

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as workers:
                for _ in range(args.concurrency):
                    workers.start_soon(fuzzer.worker)
            done.set()
    finally:
        # Also when a dying relay takes the well-behaved clients (and this) down.
        results["fuzz_seconds"] = seconds_before + time.monotonic() - started
        results["fuzz_cpu_seconds"] = results.get("fuzz_cpu_seconds", 0.0) + time.process_time() - cpu_started


async def check_after_fuzzing(
    relay: loupelive.Relay,
    fuzzer: Fuzzer,
    catcher: RelayLogCatcher,
    steady: Steady,
    stop: trio.Event,
    live_id: str,
    results: dict[str, Any],
    checks: list[Check],
    open_agent: Callable[..., Any],
    open_viewer: Callable[..., Any],
) -> None:
    # Does each distinct internal error come back from its input alone?
    results["replays"] = await replay_errors(fuzzer, catcher)

    stop.set()
    caught_up = await poll(lambda: len(steady.items) >= steady.logged, 60)
    steady_check = check_steady(steady)
    if not caught_up:
        steady_check = Check(
            steady_check.name, False, f"the viewer did not catch up within 60 s: {steady_check.detail}"
        )
    checks.append(steady_check)

    checks.append(await check_new_session(open_agent, open_viewer))

    grace = relay.config.agent_grace + relay.config.end_flush_timeout + relay.config.stream_grace + 15
    print(
        f"waiting up to {grace:.0f} s for {len(relay.sessions) - 1} fuzz sessions to end (agent_grace)",
        flush=True,
    )
    wanted = {
        "sessions": [live_id],
        "agent_connections": 1,
        "agent_data_connections": 1,
        "viewer_connections": 1,
        "viewer_streams": 1,
        "queued_bytes": 0,
        "open_connections": 4,
    }
    settled = await poll(lambda: counts(relay) == wanted, grace, 0.25)
    now = counts(relay)
    checks.append(
        Check(
            "only_the_well_behaved_left", settled, f"{now}" if settled else f"expected {wanted}, have {now}"
        )
    )
    if not settled:
        results["relay_tasks_while_well_behaved_open"] = relay_task_dump(relay)


async def replay_errors(fuzzer: Fuzzer, catcher: RelayLogCatcher) -> list[dict[str, Any]]:
    """Replay the first single-connection input of each distinct internal error once."""
    seen: set[tuple[str | None, str | None]] = set()
    replays: list[dict[str, Any]] = []
    for error in list(catcher.errors):
        signature = (error.exc_type, error.location)
        if signature in seen or error.job is None:
            continue
        job = fuzzer.find_job(error.job)
        if job is None or len(job.conns) != 1:
            continue
        seen.add(signature)
        before = len(catcher.errors)
        replay = await fuzzer.run_job(10**9 + len(replays), replay=job.conns[0])
        await trio.sleep(0.2)
        reproduced = any((e.exc_type, e.location) == signature for e in catcher.errors[before:])
        replays.append(
            {"job": job.id, "replay_job": replay.id, "signature": list(signature), "reproduced": reproduced}
        )
    return replays


def summarize_errors(
    catcher: RelayLogCatcher, fuzzer: Fuzzer | None, replays: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    groups: dict[tuple[str | None, str | None, str], list[LoggedError]] = {}
    for error in catcher.errors:
        kind = error.message.split(": ")[-1] if error.traceback else error.message
        key = (error.exc_type, error.location, kind)
        groups.setdefault(key, []).append(error)
    out = []
    for (exc_type, location, kind), errors in groups.items():
        examples: list[dict[str, Any]] = []
        for error in errors:
            if len(examples) >= EXAMPLES_PER_ERROR:
                break
            job = fuzzer.find_job(error.job) if fuzzer is not None and error.job is not None else None
            related = (
                fuzzer.related.get(error.job, []) if fuzzer is not None and error.job is not None else []
            )
            examples.append(
                {
                    "job": error.job,
                    "log_message": error.message,
                    "exception": error.exception,
                    "input": job_report(job) if job is not None else None,
                    "concurrent_jobs_on_the_same_session": [
                        job_report(other)
                        for other in (fuzzer.find_job(i) for i in related if fuzzer is not None)
                        if other is not None
                    ],
                }
            )
        replay = [r for r in replays if tuple(r["signature"]) == (exc_type, location)]
        out.append(
            {
                "exception_type": exc_type,
                "location": location,
                "log": kind,
                "count": len(errors),
                "traceback": errors[0].traceback,
                "reproduced_by_replay": replay[0]["reproduced"] if replay else None,
                "examples": examples,
            }
        )
    return out


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` under its transport, keeping the last run of the other transport."""
    runs: dict[str, Any] = {}
    try:
        previous = json.loads(path.read_text())
        if isinstance(previous, dict) and previous.get("benchmark") == "fuzz_relay":
            runs = dict(previous.get("runs", {}))
    except (OSError, ValueError):
        pass
    runs[summary["settings"]["transport"]] = summary
    document = {
        "benchmark": "fuzz_relay",
        "note": "the last run of each transport (memory streams, TCP loopback); see scripts/fuzz_relay.py",
        "runs": dict(sorted(runs.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")


def print_job(title: str, report: dict[str, Any]) -> None:
    print(
        f"  {title}: job {report['job']} ({report['kind']}, sessions {report['sessions']}, "
        f"mutations {report['mutations'][:8]}, endings {report['endings']}):"
    )
    for conn in report["connections"]:
        print(f"    {conn['port']} port, {conn['bytes']} bytes sent, relay answered {conn['outcome']!r}:")
        for line in conn["frames"][:10]:
            print(f"      {line[:240]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames to throw (default 100,000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--tcp", action="store_true", help="real loopback sockets instead of memory streams")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON summary (default {DEFAULT_OUT})")
    parser.add_argument("--concurrency", type=int, default=50, help="jobs at a time (default 50)")
    parser.add_argument("--verbose", action="store_true", help="print every relay ERROR as it happens")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)

    catcher = RelayLogCatcher()
    catcher.verbose = args.verbose
    # The relay's logger (its ERROR records are the point), and the package's
    # (client errors), kept off stderr: thousands of rejections are logged.
    for name in ("loupelive.relay", "loupelive"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.addHandler(catcher)
        logger.propagate = False

    results: dict[str, Any] = {"checks_raw": [], "crashes": []}
    wall = time.monotonic()
    trio.run(run, args, results, catcher)
    wall = time.monotonic() - wall

    fuzzer: Fuzzer | None = results.pop("fuzzer", None)
    checks: list[Check] = results.pop("checks_raw")
    crashes: list[dict[str, Any]] = results["crashes"]
    done = {check.name for check in checks}
    for name in (
        "well_behaved_stream",
        "relay_serves_new_session",
        "only_the_well_behaved_left",
        "nothing_left_after_close",
    ):
        if name not in done:
            checks.append(Check(name, False, "not checked: the relay died"))
    replays = results.get("replays", [])
    internal = [e for e in catcher.errors if e.traceback]
    checks.append(
        Check(
            "no_internal_errors",
            not catcher.errors,
            f"{len(internal)} ERROR records with a traceback, {len(catcher.errors) - len(internal)} without"
            if catcher.errors
            else "no ERROR record from loupelive.relay",
        )
    )
    if fuzzer is not None:
        early = f" ({len(crashes)} relay crashes, relay restarted)" if crashes else ""
        checks.append(
            Check(
                "fuzzer_ran",
                fuzzer.frames >= args.frames and not fuzzer.fuzzer_error_count,
                f"{fuzzer.frames:,} frames{early}, {fuzzer.fuzzer_error_count} fuzzer errors",
            )
        )
    else:
        checks.append(Check("fuzzer_ran", False, "the fuzzer did not start"))
    errors = summarize_errors(catcher, fuzzer, replays)
    fuzz_seconds = results.get("fuzz_seconds", 0.0)
    ok = all(check.ok for check in checks)

    summary: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "frames": args.frames,
            "seed": args.seed,
            "transport": "tcp" if args.tcp else "memory",
            "concurrency": args.concurrency,
            "connection_bound_s": CONNECTION_BOUND,
            "stream_job_bound_s": STREAM_JOB_BOUND,
        },
        "relay_config": results.get("relay_config"),
        "ok": ok,
        "checks": [dataclasses.asdict(check) for check in checks],
        "seconds": {
            "fuzzing": round(fuzz_seconds, 2),
            "fuzzing_cpu": round(results.get("fuzz_cpu_seconds", 0.0), 2),
            "total": round(wall, 2),
        },
    }
    if fuzzer is not None:
        summary.update(
            {
                "frames": fuzzer.frames,
                "frames_per_s": round(fuzzer.frames / fuzz_seconds, 1) if fuzz_seconds else None,
                "jobs": fuzzer.jobs,
                "connections": fuzzer.connections,
                "connections_per_s": round(fuzzer.connections / fuzz_seconds, 1) if fuzz_seconds else None,
                "bytes_sent": fuzzer.bytes_sent,
                "bytes_received": fuzzer.bytes_received,
                "jobs_by_kind": dict(fuzzer.job_kinds.most_common()),
                "frames_by_job_kind": dict(fuzzer.frames_by_kind.most_common()),
                "jobs_cut_by_their_bound": fuzzer.timeouts,
                "jobs_cut_by_a_relay_crash": fuzzer.cut_by_crash,
                "job_seconds": {
                    kind: {
                        "mean": round(sum(values) / len(values), 4),
                        "p99": round(sorted(values)[int(len(values) * 0.99)], 4),
                        "max": round(max(values), 4),
                    }
                    for kind, values in sorted(fuzzer.durations.items())
                },
                "tcp_connect_seconds_max": round(fuzzer.connect_seconds_max, 4) if args.tcp else None,
                "endings": dict(fuzzer.endings.most_common()),
                "mutations": dict(fuzzer.mutations.most_common()),
                "outcomes": dict(fuzzer.outcomes.most_common()),
                "fuzzer_errors": fuzzer.fuzzer_errors,
            }
        )
    summary["relay_rejected"] = results.get("rejected", {})
    summary["relay_statistics"] = results.get("relay_statistics", {})
    summary["relay_log_records"] = dict(catcher.levels.most_common())
    summary["well_behaved"] = results.get("well_behaved")
    summary["relay_crashes"] = crashes
    summary["internal_errors"] = errors
    summary["replays"] = replays
    summary["client_errors"] = [dataclasses.asdict(e) for e in catcher.other_errors[:20]]
    for key in ("relay_tasks_while_well_behaved_open", "relay_tasks_after_close"):
        if results.get(key):
            summary[key] = results[key]

    write_summary(args.out, summary)

    # -- the printed report --
    print()
    if fuzzer is not None:
        print(
            f"{fuzzer.frames:,} frames in {fuzzer.connections:,} connections ({fuzzer.jobs:,} jobs) "
            f"in {fuzz_seconds:.1f} s: {summary['frames_per_s'] or 0:,.0f} frames/s, "
            f"{summary['connections_per_s'] or 0:,.0f} connections/s "
            f"({'TCP' if args.tcp else 'memory streams'}, seed {args.seed})"
        )
        print("relay rejections by code (statistics().rejected, summed over the relay's lives):")
        for code, count in summary["relay_rejected"].items():
            print(f"  {code:24} {count:8,}")
        print("what the fuzzing connections saw (per connection):")
        for outcome, count in fuzzer.outcomes.most_common():
            print(f"  {outcome:34} {count:8,}")
    print("checks:")
    for check in checks:
        print(
            f"  {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail.splitlines()[0] if check.detail else ''}"
        )
    shown: set[tuple[str | None, str | None]] = set()
    for crash in crashes:
        signature = (crash["exception_type"], crash["location"])
        same = sum(1 for c in crashes if (c["exception_type"], c["location"]) == signature)
        if signature in shown:
            continue
        shown.add(signature)
        print()
        print(
            f"RELAY CRASH: {same} × {crash['exception']} at {crash['location']}; "
            f"the input alone kills a fresh relay: {crash['reproduced_on_a_fresh_relay']}"
        )
        print(crash["traceback"])
        if crash["input"]:
            print_job("input", crash["input"])
    for error in errors:
        print()
        print(
            f"RELAY BUG: {error['count']} × {error['exception_type']} at {error['location']} "
            f"({error['log']}); reproduced by replay: {error['reproduced_by_replay']}"
        )
        if error["traceback"]:
            print(error["traceback"])
        first = error["examples"][0] if error["examples"] else None
        if first and first["input"]:
            print_job("input", first["input"])
            for other in first["concurrent_jobs_on_the_same_session"][:3]:
                print_job("concurrent job on the same session", other)
    if catcher.other_errors:
        print(
            f"\n{len(catcher.other_errors)} ERROR records from loupelive clients (see client_errors in the summary)"
        )
    print(f"\nsummary written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

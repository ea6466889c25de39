#!/usr/bin/env python3
"""Load test: many real agents and viewers through a real relay, every seq checked.

::

    python scripts/loadtest.py --agents N [--watched K] [--viewers-per-session M]
        [--stalled-viewers X] [--mode bulk|trickle|idle] [--rate R] [--unwatched-rate U] [--seconds S]
        [--corpus DIR] [--relay HOST:PORT [--viewer-port P]] [--tls [--ca FILE]]
        [--relays R --cluster [--no-single] [--nats-server PATH]] [--settle S] [--pause-lists]
        [--agent-procs P] [--viewer-procs V] [--json PATH]

What runs
---------
* **Relay.**  Without ``--relay`` a real relay subprocess:
  ``python -m loupelive serve --agent-port 0 --viewer-port 0 --ready-file …`` on
  127.0.0.1 (with ``--tls``: a throw-away CA and certificate from ``trustme``),
  stopped with SIGTERM at the end.  With ``--relay HOST:PORT`` an existing relay
  on a loopback address is loaded: PORT is its agent port, its viewer port is
  PORT + 1 unless ``--viewer-port`` says otherwise.
* **Agents.**  N sessions, each a real ``loupelive.open_agent``, spread round
  robin over P worker processes (this script with a hidden ``--worker agents``).
  The first K sessions are *watched*.  Their records replay the corpus
  (``--corpus``, default ``../shared/corpus/loghub`` when it exists, else
  ``corpus.synthetic_records``): every system in file order, one after the
  other, repeated; session *i* starts at record 7919·*i* (mod the corpus
  length), so sessions differ.  (Replaying one 2,000-line system over and over
  would be unrealistic: it fits in brotli's 256 KiB window and the repeats
  compress to almost nothing.)  ``log()`` sets every timestamp from
  ``time.time()``; the corpus's own timestamps are not used.
* **Viewers.**  Each watched session has M viewers, each a real
  ``open_viewer`` + ``open_stream`` (own control and data connection), in V
  worker processes of their own (``--worker viewers``).  Each consumer
  iterates its ``Stream`` and yields to Trio every 100 items: ``Stream`` hands
  out frames it already holds without a checkpoint, so without this one viewer
  with a backlog keeps the event loop for a whole 256 KiB read (tens of
  thousands of records) and the other viewers of the process wait.  X of the M
  (``--stalled-viewers``) are *stalled*: they read until the warm-up probe
  arrives (so they are known to be subscribed) and then not at all during the
  measurement, leaving the relay to skip or drop them (``slow_consumer``).
  They read again only once the active viewers have covered their sessions'
  last seqs (so their catching up costs the measurement nothing), to check
  what the relay told them (gaps, ``slow_consumer``); they are reported apart
  and kept out of the delivered/latency figures.
  Every viewer also holds the relay's session list, as any viewer does: it
  gets the list updates (SESSION_COUNTS once a second for every session
  whose counters changed) on its control connection, unless
  ``--pause-lists`` (``Viewer.pause_list()`` once its stream is open; the
  coordinator's own statistics viewers, one per relay, pause theirs before
  the measurement).
* **Cluster** (``--relays R --cluster``, R ≥ 2).  The same workload twice:
  first on one relay as above (``--no-single`` skips it), then on R relays
  joined over NATS.  For the second run the script starts one ``nats-server``
  (``--nats-server``, else from PATH or /usr/sbin) on 127.0.0.1 with client
  and monitoring ports of its choosing (``-p -1 -m -1``), ready once it says
  "Server is ready" on stderr, and R relays ``serve … --cluster
  nats://127.0.0.1:PORT --relay-name rN``.  Agent *i* registers with relay
  *i* mod R; the viewers of session *i* connect to relay (*i* + 1) mod R, so
  every stream crosses NATS (one feed per session: all of a session's viewers
  are on one relay).  Before the agents start, every relay must list every
  other as a peer (``cluster.peers`` in its statistics); after they register,
  every relay must list every session of the run (the directory has
  converged; each is timed).  A hidden worker (``--worker nats-tap``,
  nats-py under trio-asyncio) subscribes to everything but the feeds
  (``P.alive``, ``P.dir``, ``P.sync``, ``P.ctl.*``) and counts messages and
  bytes by kind over the measurement.  Every check below applies to both
  runs unchanged; the run fails if either fails.  No plain fan-out baseline
  is run with ``--cluster``.

Modes
-----
``bulk``
    every watched agent logs as fast as it can: ``agent.log`` in a loop,
    yielding to Trio (``trio.lowlevel.checkpoint``) every 100 records so its
    streamer and the other agents of the process get their turn.  (The
    streamer sends what accumulated since its last send, so batches hold
    about two such chunks: the batch size follows how often the application
    yields.)  The agent's ring buffer (10,000 records) overflows when logging
    outruns the link; those records are reported as ``agent_overflow`` gaps
    and counted as lost.
``trickle``
    every watched agent logs R records/s (``--rate``), each session with a
    random phase.  With ``--unwatched-rate U`` the sessions nobody watches log
    U records/s as well: nobody receives those records, but their agents
    report their counters (at most once a second), which the relay passes to
    viewers' lists and, in a cluster, publishes to every relay; the idle
    figures are then null.
``idle``
    nobody watches (K = 0): the sessions are registered and only heartbeats
    flow; N may be 10,000 (check the open-file limit; see below).

Sequence of a run
-----------------
(cluster: nats-server and relays up → every relay hears its peers →) agents
register (→ cluster: every relay lists every session) → viewers subscribe →
warm-up: every watched agent logs one probe record (logger
``loadtest.probe``) every 0.1 s until every viewer has received one (so
every viewer is live) → ``--settle`` seconds (default 0: none; a few seconds
keep the relay's first clock probes, four in the first 2 s of every agent
connection, and the list updates they cause out of the window) → **go**: the agents start at the same
wall-clock instant and log for S seconds → each agent reports its seq range
→ viewers read until they have covered the last seq of their session (bounded
by ``--drain-timeout``) → everything is closed and the relay stopped.  The
delivery time (``elapsed_s``) runs from go until the last active viewer has
covered its session's last seq.

Checks (the run exits 1 if any fails)
--------------------------------------
Every viewer checks its stream item by item: every seq exactly once and in
order, either as a record or inside a gap.  Gaps with reasons
``agent_overflow``, ``viewer_slow``, ``history_unavailable``,
``stream_restart`` and (in a cluster) ``cluster_overflow`` are legitimate and
counted by reason (``cluster_overflow_gaps`` / ``cluster_overflow_seqs``
apart as well).  A ``Gap(…,
"missing")`` (the viewer client's word for a hole nobody explained), any other
reason, a hole without a gap, a duplicate or a step back is an error, as is an
active viewer that had not covered its session's last seq when the drain
timed out, or that lost its connection.  Worker crashes and relay tracebacks
fail the run too.  Stalled viewers are held to the same continuity rules,
but their connection ending (``slow_consumer``, or a reset once the relay's
send deadline passed) is the expected outcome and only reported.  Note that
the viewer client resumes a broken stream by itself (asking for the records
after the last seq it delivered), so a reset can show up as a legitimate
``history_unavailable`` gap rather than as an error.

Figures (``--json`` writes them as one object)
----------------------------------------------
``records_sent``
    records logged by watched agents during the measurement (seq ranges the
    agents report); ``records_delivered``: records received by the active
    viewers (with no loss: records_sent × active viewers per session);
    ``records_lost``: seqs an active viewer did not get as a record (legit
    gaps included), ``records_duplicated``: duplicates seen.
``delivered_records_per_s``
    records_delivered / elapsed_s (summed over active viewers).
``wire_bytes_per_record``
    ``AgentStatistics.bytes_sent`` (BATCH and GAP frames on the agents' data
    connections, frame headers included) divided by
    ``AgentStatistics.records_sent`` (records that actually left in batches),
    both as deltas over the measurement.  ``json_bytes_per_record``: the mean
    size of the logged records as compact JSON lines (``Record.to_json()``,
    as in ``bench_compression.py``).
``latency_ms``
    p50 / p99 / max of ``time.time()`` in the viewer's consumer minus
    ``record.timestamp`` (set by ``log()``), over every delivered record, from
    a log-scale histogram (2.2 % resolution; ``max`` is exact).
``relay_rss_mb`` / ``relay_cpu_s``
    peak VmRSS of the relay process (sampled every 0.5 s) and its user +
    system CPU seconds between go and the end of delivery, from
    ``/proc/PID/status`` and ``/proc/PID/stat``.  For ``--relay`` the pid is
    found through ``/proc/net/tcp`` (null if not visible).
    ``relay_rss_kb_per_session``: (peak RSS − RSS before the first agent
    connected) / N.
``relay.statistics``
    the relay's own counters over the measurement (bytes and records in and
    out, records dropped for slow viewers, gaps by reason, slow-consumer
    disconnects, rejections), asked over a viewer connection of the
    coordinator's (``Viewer.statistics()``), at go and at the end of delivery;
    null where the relay does not answer.
``cluster`` (cluster runs; null otherwise)
    over the measurement (go → end of delivery), from each relay's
    ``statistics().cluster`` at go and at the end: ``statistics`` (summed
    deltas of ``feed_bytes_out``, ``feed_bytes_in``, ``cluster_overflow_gaps``,
    ``feed_holes``, ``nats_inbox_drops``, ``nats_reconnects``, …);
    ``feed_bytes_out_per_delivered_record`` = Σ ``feed_bytes_out`` / records
    delivered (bytes crossing NATS per record: feed messages with their 11-byte
    head and session id; with M viewers per session on the watching relay one
    copy serves all M); ``nats_server``: its CPU seconds and peak RSS
    (``/proc``) and the ``/varz`` counters (``in_bytes``: payload published,
    ``out_bytes``: payload delivered, to every subscriber, the tap included),
    ``other_in_bytes`` = ``in_bytes`` − feeds; ``directory``: the tap's
    counts by kind (``alive``, ``dir.counts``, ``dir.session``,
    ``dir.snapshot``, ``ctl.add``, …), bytes as published once (NATS then
    delivers each to every relay), B per counts entry and per alive;
    ``setup``: ``peers_s`` and ``directory_s`` (last registration → every
    list complete); ``per_relay``: agents, viewers, CPU, RSS (baseline with
    NATS connected, after registration, peak) and its own deltas.  The
    top-level figures are the cluster run's: ``relay_cpu_s`` and the RSS
    figures are sums over the R relays, ``relay_rss_kb_per_session`` is
    (Σ peak − Σ baseline) / N.  ``single`` holds the single-relay run's
    results (same shape) and ``comparison`` sets the main figures side by
    side: ``{"single", "cluster", "cluster_over_single"}`` each.
``idle_bytes_per_s_per_session``
    **Method:** application bytes in both directions on the agents' control
    connections (``Connection.bytes_sent + bytes_received`` of
    ``agent._control``), summed over the sessions nobody watches, over the
    measurement window, / window / sessions.  Counted at the agents because a
    relay subprocess exposes no statistics, ``/proc/PID/io`` does not count
    socket traffic and ``/proc/net/dev`` counts every process on the loopback
    interface.  This is payload (frames: heartbeats, commands); TCP/IP headers
    (about 52 bytes per segment and its ACK on loopback) come on top:
    ``idle_segments_estimate`` gives the estimate with them.  Null when every
    session is watched.
``relay_vs_plain``
    after the relay run, the same bytes (per watched session: the bytes its
    agent sent during the measurement, in writes of its mean batch size) go
    through a plain Trio TCP fan-out: K senders in P processes → one
    forwarder process (``receive_some``, then ``send_all`` to each of the
    session's receivers in turn) → one receiver per active viewer in V
    processes.  No protocol, no compression, no decoding; plain TCP even with
    ``--tls``; stalled viewers have no receiver (a plain fan-out would block on
    them).  Median of ``--plain-rounds`` transfers.  ``relay_vs_plain`` =
    (bytes / elapsed_s) / (bytes / plain seconds).  In ``trickle`` mode the
    relay run is paced by R, so the ratio is headroom, not efficiency.

Client addresses
----------------
The relay caps connections per client address (``max_connections_per_address``,
4,000 by default), and every client here is local.  So clients connect from
loopback source addresses of their own, ``--per-source`` (1,000) clients each:
agents from 127.0.0.10, .11, …, viewers from 127.0.1.10, … (all of
127.0.0.0/8 is loopback on Linux; the relay still listens on 127.0.0.1 only).
To the relay they look like clients on several hosts; ``--per-source 0``
connects everything from 127.0.0.1.

Bounds and cleanup
------------------
Every phase has a deadline.  All processes run in their own process group
with a parent-death signal (``scripts/_procs.py``); the coordinator stops
them all in ``finally``, also on Ctrl-C and SIGTERM.  Workers also exit when
their stdin (the coordinator) closes.  The soft open-file limit is raised to
the hard one; the relay needs about N + K + 2·K·M descriptors and an agent
process N/P + K/P, checked before starting (raise ``--agent-procs``).  Worker
and relay logs are written to a temporary directory, kept with
``--keep-logs`` or when the run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import attrs
import trio
import trio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from corpus import corpus_or_synthetic, default_corpus_dir

import loupelive
from loupelive import ConnectionClosed, Gap, Level, LoupeError, Record
from loupelive.messages import Heartbeat, encode_message

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
APP: Final = "loadtest"
PROBE_LOGGER: Final = "loadtest.probe"
LEGIT_GAP_REASONS: Final = (
    "agent_overflow",
    "viewer_slow",
    "history_unavailable",
    "stream_restart",
    "cluster_overflow",
)
MODES: Final = ("bulk", "trickle", "idle")
#: Items a viewer's consumer takes between two yields to the Trio scheduler
#: (``--consumer-yield``, hidden; 0: never yield explicitly).
CONSUMER_YIELD: Final = 100
#: Records a bulk agent logs between two yields to the Trio scheduler.
BULK_CHUNK: Final = 100
#: Session i replays the corpus from record i × this (mod its length).
REPLAY_STRIDE: Final = 7919
#: Agents (or viewers) of one process connecting at the same time.
CONNECT_CONCURRENCY: Final = 32
#: Tries to register one agent (the client's handshake deadline is a fixed 10 s).
REGISTER_ATTEMPTS: Final = 4
PROGRESS_INTERVAL: Final = 1.0
#: Workers report their counters this often, so the line is never stale.
REPORT_INTERVAL: Final = 0.25
SAMPLE_INTERVAL: Final = 0.5
PROBE_INTERVAL: Final = 0.1
#: Histogram buckets per doubling (2^(1/32) = 2.2 % resolution).
HIST_SCALE: Final = 32
#: A timestamp with as many digits as the ones log() makes, for JSON sizes.
REFERENCE_TIMESTAMP: Final = 1_764_000_000.123456
#: Bytes read per receive_some in the plain fan-out (as loupelive's RECEIVE_SIZE).
PLAIN_RECEIVE: Final = 256 * 1024
#: Clients per loopback source address (the relay allows 4,000 connections per address).
PER_SOURCE: Final = 1000
#: Descriptors a process needs besides its connections.
FD_SLACK: Final = 64
#: TCP/IP header bytes per segment on loopback (IPv4 20 + TCP 20 + timestamps 12).
SEGMENT_OVERHEAD: Final = 52
#: The relay refuses more viewer control connections than this by default.
RELAY_MAX_VIEWER_CONNECTIONS: Final = 10_000
#: Bounds on starting the cluster: nats-server ready, every relay hearing every other.
NATS_READY_TIMEOUT: Final = 30.0
PEERS_TIMEOUT: Final = 60.0
#: How often the coordinator asks the relays whether they see their peers yet.
PEERS_POLL: Final = 0.05
#: Where nats-server may be when it is not on PATH (Debian puts it in /usr/sbin).
NATS_SERVER_FALLBACKS: Final = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server")

JSON = dict[str, Any]
LogArgs = tuple[int, str, str, str, str | None, dict[str, str]]


class RunFailed(Exception):
    """The run cannot go on (a worker failed, a deadline passed, …)."""


# -- small shared helpers ----------------------------------------------------------------


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def emit(obj: JSON) -> None:
    """A worker's report to the coordinator: one JSON line on stdout."""
    sys.stdout.buffer.write(dumps(obj))
    sys.stdout.buffer.flush()


def leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc``."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    exc = leaf(exc)
    if isinstance(exc, ConnectionClosed):
        return f"{exc.code.value}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


class LineReader:
    """Newline-delimited JSON from a Trio byte stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def read(self) -> JSON | None:
        """The next object, or None at end of stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.strip():
                    value = json.loads(line)
                    assert isinstance(value, dict)
                    return value
                continue
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._buffer += data


@attrs.define
class Histogram:
    """Latencies on a log scale: HIST_SCALE buckets per doubling, from 1 µs."""

    counts: Counter[int] = attrs.Factory(Counter)
    n: int = 0
    total: float = 0.0
    max: float = 0.0
    negative: int = 0

    def add(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        if seconds < 0:
            self.negative += 1
        micros = seconds * 1e6
        self.counts[int(math.log2(micros) * HIST_SCALE) if micros > 1.0 else 0] += 1

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)
        self.negative += other.negative

    def to_json(self) -> JSON:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "n": self.n,
            "total": self.total,
            "max": self.max,
            "negative": self.negative,
        }

    @classmethod
    def from_json(cls, obj: JSON) -> Histogram:
        return cls(
            counts=Counter({int(k): v for k, v in obj["counts"].items()}),
            n=obj["n"],
            total=obj["total"],
            max=obj["max"],
            negative=obj["negative"],
        )

    def quantile_ms(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = q * self.n
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return float(2 ** ((bucket + 0.5) / HIST_SCALE) / 1000.0)
        return self.max * 1000.0

    def summary(self) -> JSON:
        return {
            "p50": self.quantile_ms(0.50),
            "p99": self.quantile_ms(0.99),
            "max": self.max * 1000.0 if self.n else None,
            "mean": self.total / self.n * 1000.0 if self.n else None,
            "samples": self.n,
        }


def digits_total(first: int, last: int) -> int:
    """Sum of len(str(n)) for n in first..last."""
    total = 0
    low = 1
    width = 1
    while low <= last:
        high = low * 10 - 1
        a, b = max(first, low), min(last, high)
        if a <= b:
            total += (b - a + 1) * width
        low *= 10
        width += 1
    return total


async def sleep_until_wall(when: float) -> None:
    await trio.sleep(max(0.0, when - time.time()))


def stdin_commands() -> LineReader:
    return LineReader(trio.lowlevel.FdStream(os.dup(0)))


Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


def source_connector(cfg: JSON, kind: str, index: int) -> Connector | None:
    """TCP from a loopback source address of its own per ``per_source`` clients.

    The relay limits connections per client address (4,000 by default); ten
    thousand agents on one machine would all be 127.0.0.1.  Spreading them
    over 127.0.0.0/8 (all loopback on Linux) looks to the relay like clients
    on several hosts.  Agents use 127.0.0.10, .11, …; viewers (two connections
    each) 127.0.1.10, …
    """
    per_source: int = cfg["per_source"]
    if not per_source or not cfg["host"].startswith("127."):
        return None
    if kind == "agent":
        source = f"127.0.0.{10 + index // per_source}"
    else:
        source = f"127.0.1.{10 + index // max(1, per_source // 2)}"

    async def connect(host: str, port: int) -> trio.abc.Stream:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            await sock.bind((source, 0))
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    return connect


# -- the agents worker ------------------------------------------------------------------


@attrs.define(eq=False)
class Replay:
    """One corpus system as ``log()`` arguments, with each record's JSON line size."""

    args: list[LogArgs]
    #: Prefix sums of the JSON line sizes, with the seq's digits left out.
    prefix: list[int]

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> Replay:
        from bench_compression import json_line

        args: list[LogArgs] = []
        prefix = [0]
        for r in records:
            args.append((int(r.level), r.message, r.logger, r.thread, r.exception, dict(r.fields)))
            size = len(json_line(attrs.evolve(r, seq=0, timestamp=REFERENCE_TIMESTAMP))) - 1
            prefix.append(prefix[-1] + size)
        return cls(args=args, prefix=prefix)

    def json_bytes(self, offset: int, count: int) -> int:
        """JSON bytes of ``count`` records replayed from ``offset`` (seq digits excluded)."""
        size = len(self.args)
        full, rest = divmod(count, size)
        total = full * self.prefix[size]
        end = offset + rest
        if end <= size:
            total += self.prefix[end] - self.prefix[offset]
        else:
            total += self.prefix[size] - self.prefix[offset] + self.prefix[end - size]
        return total


def load_replay(corpus: str | None) -> tuple[Replay, str]:
    """Every record of the corpus, the systems one after another in file order."""
    systems, source = corpus_or_synthetic(corpus)
    records = [r for system in systems.values() for r in system]
    if not records:
        raise RunFailed(f"the corpus {source} has no records")
    return Replay.from_records(records), f"{source} ({len(systems)} systems, {len(records)} records)"


@attrs.define(eq=False)
class LocalAgent:
    """One agent of an agents worker, with what the measurement needs."""

    index: int
    session_id: str
    watched: bool
    planned_id: str = ""
    #: Which relay it registers with (an index into the config's ``relays``).
    relay: int = 0
    replay: Replay | None = None
    offset: int = 0
    agent: loupelive.Agent | None = None
    start_seq: int = 0
    last_seq: int = 0
    stats0: loupelive.AgentStatistics | None = None
    control0: Any = None
    control_bytes0: tuple[int, int] = (0, 0)
    #: (sent, received) on the control connection during the window.
    control_bytes: tuple[int, int] | None = None

    def running(self) -> loupelive.Agent:
        assert self.agent is not None
        return self.agent

    def _control(self) -> tuple[Any, tuple[int, int]]:
        conn = self.running()._control
        if conn is None:
            return None, (0, 0)
        return conn, (conn.bytes_sent, conn.bytes_received)

    def start(self) -> None:
        self.stats0 = self.running().statistics()
        self.start_seq = self.stats0.records_logged + 1
        self.control0, self.control_bytes0 = self._control()

    def stop(self) -> None:
        self.last_seq = self.running().statistics().records_logged
        conn, nbytes = self._control()
        # A reconnect replaced the connection: its bytes are not comparable.
        same = conn is not None and conn is self.control0
        sent0, received0 = self.control_bytes0
        self.control_bytes = (nbytes[0] - sent0, nbytes[1] - received0) if same else None

    def report(self) -> JSON:
        assert self.stats0 is not None
        now = self.running().statistics()
        logged = self.last_seq - self.start_seq + 1
        json_bytes = 0
        if self.replay is not None and logged > 0:
            json_bytes = self.replay.json_bytes(self.offset, logged) + digits_total(
                self.start_seq, self.last_seq
            )
        return {
            "session": self.session_id,
            "logged": logged,
            "first_seq": self.start_seq,
            "last_seq": self.last_seq,
            "bytes_sent": now.bytes_sent - self.stats0.bytes_sent,
            "records_sent": now.records_sent - self.stats0.records_sent,
            "batches_sent": now.batches_sent - self.stats0.batches_sent,
            "records_dropped": now.records_dropped - self.stats0.records_dropped,
            "json_bytes": json_bytes,
        }


async def _bulk(local: LocalAgent, end_at: float) -> None:
    assert local.replay is not None
    log = local.running().log
    args = local.replay.args
    size = len(args)
    i = local.offset
    checkpoint = trio.lowlevel.checkpoint
    while time.time() < end_at:
        for _ in range(BULK_CHUNK):
            level, message, logger, thread, exception, fields = args[i]
            log(level, message, logger=logger, thread=thread, exception=exception, fields=fields)
            i += 1
            if i == size:
                i = 0
        await checkpoint()


async def _trickle(local: LocalAgent, start_at: float, end_at: float, rate: float) -> None:
    assert local.replay is not None
    log = local.running().log
    args = local.replay.args
    size = len(args)
    i = local.offset
    period = 1.0 / rate
    due = start_at + random.random() * period
    while due < end_at:
        delay = due - time.time()
        if delay > 0:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        level, message, logger, thread, exception, fields = args[i]
        log(level, message, logger=logger, thread=thread, exception=exception, fields=fields)
        i = i + 1 if i + 1 < size else 0
        due += period


async def agents_worker(cfg: JSON) -> None:
    mode: str = cfg["mode"]
    local = [
        LocalAgent(index, sid, watched, sid, relay=relay) for index, sid, watched, relay in cfg["agents"]
    ]
    watched = [a for a in local if a.watched]
    unwatched_rate: float = cfg.get("unwatched_rate", 0.0)
    # With --unwatched-rate the sessions nobody watches log too (their
    # records only feed their counters and ring buffers).
    logging_unwatched = [a for a in local if not a.watched] if unwatched_rate else []
    source = ""
    if watched or logging_unwatched:
        replay, source = load_replay(cfg["corpus"])
        for a in watched + logging_unwatched:
            a.replay = replay
            a.offset = a.index * REPLAY_STRIDE % len(replay.args)
    limiter = trio.Semaphore(CONNECT_CONCURRENCY)
    registered = trio.Event()
    finish = trio.Event()
    count = retries = 0
    log = logging.getLogger("loadtest.agents")
    t0 = time.monotonic()

    async def run_one(a: LocalAgent) -> None:
        nonlocal retries
        for attempt in range(1, REGISTER_ATTEMPTS + 1):
            try:
                await register_and_hold(a)
                return
            except (OSError, ConnectionClosed) as exc:
                # A loaded relay (or machine) can miss the clients' fixed 10 s
                # handshake deadline; retry the registration, and count it.
                if a.agent is not None or attempt == REGISTER_ATTEMPTS:
                    raise
                retries += 1
                log.warning("session %s: registration failed (%s); retrying", a.session_id, describe(exc))
            await trio.sleep(attempt * random.uniform(0.5, 1.0))
            # The relay may have registered the attempt that timed out on our
            # side (it keeps a lost session for agent_grace): use a new id.
            a.session_id = f"{a.planned_id}-r{attempt}"

    async def register_and_hold(a: LocalAgent) -> None:
        nonlocal count
        await limiter.acquire()
        released = False
        try:
            async with loupelive.open_agent(
                cfg["host"],
                cfg["relays"][a.relay][0],
                app=APP,
                app_version=cfg["run_id"],
                session_id=a.session_id,
                tags={"loadtest": cfg["run_id"], "watched": "yes" if a.watched else "no"},
                tls=cfg["tls"],
                ca_file=cfg["ca_file"],
                connector=source_connector(cfg, "agent", a.index),
            ) as agent:
                limiter.release()
                released = True
                a.agent = agent
                count += 1
                if count == len(local):
                    registered.set()
                await finish.wait()
        finally:
            if not released:
                limiter.release()

    async def progress() -> None:
        while True:
            await trio.sleep(REPORT_INTERVAL)
            logged = sum(a.running().statistics().records_logged - a.start_seq + 1 for a in watched)
            emit({"event": "progress", "logged": logged})

    async def run_load(start_at: float, seconds: float, rate: float) -> None:
        await sleep_until_wall(start_at)
        window_start = time.time()
        for a in local:
            a.start()
        end_at = start_at + seconds
        async with trio.open_nursery() as outer:
            outer.start_soon(progress)
            async with trio.open_nursery() as loggers:
                for a in watched:
                    if mode == "bulk":
                        loggers.start_soon(_bulk, a, end_at)
                    elif mode == "trickle":
                        loggers.start_soon(_trickle, a, start_at, end_at, rate)
                for a in logging_unwatched:
                    loggers.start_soon(_trickle, a, start_at, end_at, unwatched_rate)
                await sleep_until_wall(end_at)
            outer.cancel_scope.cancel()
        window = time.time() - window_start
        for a in local:
            a.stop()
        control: JSON = {}
        for name, group in (("unwatched", [a for a in local if not a.watched]), ("watched", watched)):
            measured = [a.control_bytes for a in group if a.control_bytes is not None]
            control[name] = {
                "bytes": sum(sent + received for sent, received in measured),
                "sent": sum(sent for sent, _ in measured),
                "received": sum(received for _, received in measured),
                "sessions": len(measured),
                "lost": len(group) - len(measured),
            }
        emit(
            {
                "event": "stopped",
                "ranges": {a.session_id: [a.start_seq, a.last_seq] for a in watched},
                "window_s": window,
                "control": control,
            }
        )

    commands = stdin_commands()
    report: list[JSON] = []
    load_scope = trio.CancelScope()

    async def run_load_cancellable(start_at: float, seconds: float, rate: float) -> None:
        with load_scope:
            await run_load(start_at, seconds, rate)

    async with trio.open_nursery() as nursery:
        for a in local:
            nursery.start_soon(run_one, a)
        await registered.wait()
        emit(
            {
                "event": "ready",
                "agents": len(local),
                "corpus": source,
                "retries": retries,
                "seconds": time.monotonic() - t0,
                "renamed": {str(a.index): a.session_id for a in local if a.session_id != a.planned_id},
            }
        )
        while (cmd := await commands.read()) is not None:
            if cmd["cmd"] == "probe":
                for a in watched:
                    a.running().log(Level.INFO, "probe", logger=PROBE_LOGGER, thread="probe")
            elif cmd["cmd"] == "go":
                nursery.start_soon(run_load_cancellable, cmd["start_at"], cmd["seconds"], cmd["rate"])
            elif cmd["cmd"] == "finish":
                report = [a.report() for a in watched if a.stats0 is not None]
                break
        load_scope.cancel()
        finish.set()
    emit({"event": "final", "agents": report})


# -- the viewers worker -------------------------------------------------------------------


@attrs.define(eq=False)
class ViewerState:
    """One viewer's consumer: continuity, counts and latency."""

    index: int
    session_id: str
    stalled: bool
    #: Which relay it watches from (an index into the config's ``relays``).
    relay: int = 0
    covered: int | None = None
    delivered: int = 0
    duplicates: int = 0
    unexplained: int = 0
    missing_gaps: int = 0
    missing_seqs: int = 0
    gaps: Counter[str] = attrs.Factory(Counter)
    gap_seqs: Counter[str] = attrs.Factory(Counter)
    latency: Histogram = attrs.Factory(Histogram)
    opened: bool = False
    live: bool = False
    target: tuple[int, int] | None = None
    done_at: float | None = None
    settled: trio.Event = attrs.Factory(trio.Event)
    error: str | None = None
    close_code: str | None = None
    end_code: str | None = None
    on_live: Callable[[], None] | None = None

    def handle(self, item: Record | Gap) -> None:
        if isinstance(item, Record):
            seq = item.seq
            covered = self.covered
            if covered is not None and seq != covered + 1:
                if seq <= covered:
                    self.duplicates += 1
                    return
                self.unexplained += seq - covered - 1
            self.covered = seq
            if item.logger == PROBE_LOGGER:
                if not self.live:
                    self.live = True
                    if self.on_live is not None:
                        self.on_live()
                return
            self.delivered += 1
            self.latency.add(time.time() - item.timestamp)
        else:
            first = item.first_seq
            if self.covered is not None:
                if item.last_seq <= self.covered:
                    self.duplicates += item.last_seq - item.first_seq + 1
                    return
                if first > self.covered + 1:
                    self.unexplained += first - self.covered - 1
                first = max(first, self.covered + 1)
            count = item.last_seq - first + 1
            if item.reason in LEGIT_GAP_REASONS:
                self.gaps[item.reason] += 1
                self.gap_seqs[item.reason] += count
            else:
                self.missing_gaps += 1
                self.missing_seqs += count
            self.covered = item.last_seq
        if self.target is not None and self.done_at is None and self.covered >= self.target[1]:
            self.done_at = time.time()
            self.settled.set()

    def set_target(self, first: int, last: int) -> None:
        self.target = (first, last)
        if self.covered is not None and self.covered >= last and self.done_at is None:
            self.done_at = time.time()
            self.settled.set()

    @property
    def errors(self) -> int:
        return self.duplicates + self.unexplained + self.missing_seqs

    def report(self) -> JSON:
        expected = self.target[1] - self.target[0] + 1 if self.target else 0
        return {
            "index": self.index,
            "session": self.session_id,
            "stalled": self.stalled,
            "expected": expected,
            "delivered": self.delivered,
            "covered": self.covered,
            "complete": self.done_at is not None,
            "done_at": self.done_at,
            "duplicates": self.duplicates,
            "unexplained_holes": self.unexplained,
            "missing_gaps": self.missing_gaps,
            "missing_seqs": self.missing_seqs,
            "gaps": dict(self.gaps),
            "gap_seqs": dict(self.gap_seqs),
            "error": self.error,
            "close_code": self.close_code,
            "end_code": self.end_code,
        }


async def viewers_worker(cfg: JSON) -> None:
    states = [ViewerState(index, sid, stalled, relay=relay) for index, sid, stalled, relay in cfg["viewers"]]
    consumer_yield: int = cfg["consumer_yield"]
    active = [s for s in states if not s.stalled]
    stalled = [s for s in states if s.stalled]
    all_opened = trio.Event()
    all_live = trio.Event()
    stalled_drain = trio.Event()
    finish = trio.Event()
    drain_deadline = stalled_deadline = math.inf
    opened = live = 0
    limiter = trio.Semaphore(CONNECT_CONCURRENCY)

    def note_live() -> None:
        nonlocal live
        live += 1
        if live == len(states):
            all_live.set()

    async def read(state: ViewerState, stream: loupelive.Stream, *, until_live: bool = False) -> None:
        handle = state.handle
        every = consumer_yield or math.inf
        count = 0
        async for item in stream:
            handle(item)
            if state.stalled and (state.done_at is not None or (until_live and state.live)):
                return
            count += 1
            if count >= every:
                # Stream hands out buffered frames without a checkpoint: share the loop.
                count = 0
                await trio.lowlevel.checkpoint()
        state.end_code = stream.end_code.value if stream.end_code is not None else None

    async def run_one(state: ViewerState) -> None:
        nonlocal opened
        state.on_live = note_live
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with limiter:  # only the connecting is limited
                    viewer = await stack.enter_async_context(
                        loupelive.open_viewer(
                            cfg["host"],
                            cfg["relays"][state.relay][1],
                            tls=cfg["tls"],
                            ca_file=cfg["ca_file"],
                            connector=source_connector(cfg, "viewer", state.index),
                        )
                    )
                    await viewer.wait_sessions(lambda ss: any(s.session_id == state.session_id for s in ss))
                    stream = await stack.enter_async_context(viewer.open_stream(state.session_id))
                    if cfg["pause_lists"]:
                        await viewer.pause_list()
                state.opened = True
                opened += 1
                if opened == len(states):
                    all_opened.set()
                await read(state, stream, until_live=state.stalled)
                if state.stalled:
                    # Not a byte more until the active viewers are through.
                    await stalled_drain.wait()
                    with trio.move_on_at(stalled_deadline):
                        await read(state, stream)
                state.settled.set()
                await finish.wait()
        except Exception as exc:  # recorded: the coordinator decides what it means
            failure = leaf(exc)
            if not state.opened:
                raise
            if isinstance(failure, ConnectionClosed):
                state.close_code = failure.code.value
            if not (state.stalled and state.close_code == "slow_consumer"):
                state.error = describe(failure)
            state.settled.set()

    async def progress() -> None:
        while True:
            await trio.sleep(REPORT_INTERVAL)
            emit(
                {
                    "event": "progress",
                    "delivered": sum(s.delivered for s in active),
                    "gaps": sum(sum(s.gaps.values()) for s in active),
                    "errors": sum(s.errors + (s.error is not None) for s in active),
                    "stalled_delivered": sum(s.delivered for s in stalled),
                }
            )

    async def settle(drain_timeout: float) -> None:
        nonlocal stalled_deadline
        with trio.move_on_at(drain_deadline):
            for s in active:
                await s.settled.wait()
        done = [s.done_at for s in active if s.done_at is not None]
        emit(
            {
                "event": "drained",
                "done_at": max(done) if done else None,
                "incomplete": sum(1 for s in active if s.done_at is None),
            }
        )
        stalled_deadline = trio.current_time() + drain_timeout
        stalled_drain.set()
        with trio.move_on_at(stalled_deadline):
            for s in stalled:
                await s.settled.wait()
        hist = Histogram()
        hist_stalled = Histogram()
        for s in states:
            (hist_stalled if s.stalled else hist).merge(s.latency)
        emit(
            {
                "event": "final",
                "viewers": [s.report() for s in states],
                "latency": hist.to_json(),
                "latency_stalled": hist_stalled.to_json(),
            }
        )

    commands = stdin_commands()
    async with trio.open_nursery() as nursery:
        for state in states:
            nursery.start_soon(run_one, state)
        await all_opened.wait()
        emit({"event": "ready", "viewers": len(states)})
        nursery.start_soon(progress)

        async def report_live() -> None:
            await all_live.wait()
            emit({"event": "live"})

        nursery.start_soon(report_live)
        while (cmd := await commands.read()) is not None:
            if cmd["cmd"] == "expect":
                drain_deadline = trio.current_time() + cmd["drain_timeout"]
                for s in states:
                    first, last = cmd["ranges"][s.session_id]
                    s.set_target(first, last)
                nursery.start_soon(settle, cmd["drain_timeout"])
            elif cmd["cmd"] == "finish":
                break
        finish.set()
        nursery.cancel_scope.cancel()
    emit({"event": "exit"})


# -- the plain fan-out workers ----------------------------------------------------------------


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise RunFailed("connection closed during the header")
        data += chunk
    return bytes(data)


async def plain_relay_worker(cfg: JSON) -> None:
    """A trivial fan-out: each sender's bytes to every receiver of its session, in turn."""
    expected = cfg["senders"] + cfg["receivers"]
    sinks: defaultdict[int, list[trio.abc.Stream]] = defaultdict(list)
    connected = 0
    all_in = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connected
        header = await _receive_exactly(stream, 5)
        role, index = header[:1], int.from_bytes(header[1:], "big")
        connected += 1
        if connected == expected:
            all_in.set()
        if role == b"R":
            sinks[index].append(stream)
            await trio.sleep_forever()
        await all_in.wait()
        targets = sinks[index]
        while data := await stream.receive_some(PLAIN_RECEIVE):
            for target in targets:
                await target.send_all(data)

    commands = stdin_commands()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, handler, listeners)
        emit({"event": "ready", "port": listeners[0].socket.getsockname()[1]})
        await all_in.wait()
        emit({"event": "connected"})
        while (cmd := await commands.read()) is not None:
            if cmd["cmd"] == "finish":
                break
        nursery.cancel_scope.cancel()


async def _plain_connect(port: int, role: bytes, index: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(role + index.to_bytes(4, "big"))
    return stream


async def plain_send_worker(cfg: JSON) -> None:
    senders: list[JSON] = cfg["senders"]
    streams = [await _plain_connect(cfg["port"], b"S", s["index"]) for s in senders]
    emit({"event": "ready"})

    async def send(stream: trio.SocketStream, nbytes: int, chunk: int) -> None:
        payload = bytes(chunk)
        full, rest = divmod(nbytes, chunk)
        for _ in range(full):
            await stream.send_all(payload)
        if rest:
            await stream.send_all(payload[:rest])

    commands = stdin_commands()
    while (cmd := await commands.read()) is not None:
        if cmd["cmd"] == "go":
            await sleep_until_wall(cmd["start_at"])
            async with trio.open_nursery() as nursery:
                for stream, spec in zip(streams, senders, strict=True):
                    nursery.start_soon(send, stream, spec["bytes"], spec["chunk"])
            emit({"event": "sent", "round": cmd["round"]})
        elif cmd["cmd"] == "finish":
            break
    for stream in streams:
        await stream.aclose()


async def plain_recv_worker(cfg: JSON) -> None:
    receivers: list[JSON] = cfg["receivers"]
    rounds: int = cfg["rounds"]
    streams = [await _plain_connect(cfg["port"], b"R", r["index"]) for r in receivers]
    emit({"event": "ready"})
    done: list[list[float]] = [[] for _ in range(rounds)]

    async def receive(stream: trio.SocketStream, nbytes: int) -> None:
        for round_no in range(rounds):
            got = 0
            while got < nbytes:
                data = await stream.receive_some(PLAIN_RECEIVE)
                if not data:
                    raise RunFailed("the plain forwarder closed a receiver")
                got += len(data)
            done[round_no].append(time.time())
            if len(done[round_no]) == len(streams):
                emit({"event": "round_done", "round": round_no, "done_at": max(done[round_no])})

    commands = stdin_commands()
    async with trio.open_nursery() as nursery:
        for stream, spec in zip(streams, receivers, strict=True):
            nursery.start_soon(receive, stream, spec["bytes"])
        while (cmd := await commands.read()) is not None:
            if cmd["cmd"] == "finish":
                break
        nursery.cancel_scope.cancel()


# -- the NATS tap (cluster runs) ------------------------------------------------------------------


def _tap_kind(prefix: str, subject: str, data: bytes, entries: Counter[str]) -> str:
    """What a cluster message is: alive, sync, dir.<kind> or ctl.<kind> (entries counted)."""
    rest = subject[len(prefix) + 1 :]
    if rest == "dir" or rest.startswith("ctl."):
        try:
            obj = json.loads(data)
        except ValueError:
            return f"{rest.split('.')[0]}.?"
        kind = str(obj.get("kind"))
        if rest == "dir":
            if kind == "counts":
                entries["dir.counts"] += len(obj.get("counts", []))
            elif kind == "snapshot":
                entries["dir.snapshot"] += len(obj.get("sessions", []))
            return f"dir.{kind}"
        return f"ctl.{kind}"
    return rest


async def nats_tap_worker(cfg: JSON) -> None:
    """Count the cluster's messages other than feeds (alive, directory, sync, ctl), by kind.

    A NATS client of its own (nats-py under trio-asyncio, as in the relays),
    subscribed to everything but ``P.feed.*``: feeds are counted by the
    relays themselves, and tapping them would double their NATS traffic.
    """
    import nats
    import trio_asyncio

    prefix: str = cfg["prefix"]
    msgs: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    entries: Counter[str] = Counter()

    async def on_message(msg: Any) -> None:
        kind = _tap_kind(prefix, msg.subject, msg.data, entries)
        msgs[kind] += 1
        sizes[kind] += len(msg.data)

    commands = stdin_commands()
    async with trio_asyncio.open_loop():
        nc = await trio_asyncio.aio_as_trio(nats.connect)(cfg["url"], name="loupelive loadtest tap")
        for subject in ("alive", "dir", "sync", "ctl.*"):
            await trio_asyncio.aio_as_trio(nc.subscribe)(f"{prefix}.{subject}", cb=on_message)
        await trio_asyncio.aio_as_trio(nc.flush)()
        emit({"event": "ready"})
        start: tuple[Counter[str], Counter[str], Counter[str], float] | None = None
        while (cmd := await commands.read()) is not None:
            if cmd["cmd"] == "start":
                start = (Counter(msgs), Counter(sizes), Counter(entries), time.time())
            elif cmd["cmd"] == "stop" and start is not None:
                await trio_asyncio.aio_as_trio(nc.flush)()
                emit(
                    {
                        "event": "window",
                        "seconds": time.time() - start[3],
                        "msgs": dict(msgs - start[0]),
                        "bytes": dict(sizes - start[1]),
                        "entries": dict(entries - start[2]),
                        "msgs_total": dict(msgs),
                        "bytes_total": dict(sizes),
                    }
                )
            elif cmd["cmd"] == "finish":
                break
        with contextlib.suppress(Exception):
            await trio_asyncio.aio_as_trio(nc.close)()


WORKERS: Final[dict[str, Callable[[JSON], Awaitable[None]]]] = {
    "nats-tap": nats_tap_worker,
    "agents": agents_worker,
    "viewers": viewers_worker,
    "plain-relay": plain_relay_worker,
    "plain-send": plain_send_worker,
    "plain-recv": plain_recv_worker,
}


def worker_main(kind: str, config_path: str) -> int:
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {kind}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    cfg = json.loads(Path(config_path).read_text())
    try:
        trio.run(WORKERS[kind], cfg)
    except BaseException as exc:
        if isinstance(leaf(exc), KeyboardInterrupt):
            return 130
        traceback.print_exc()
        with contextlib.suppress(OSError):
            emit({"event": "error", "message": describe(exc)})
        return 1
    return 0


# -- the coordinator: processes ---------------------------------------------------------------


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text[-lines:])


class Worker:
    """A worker process: JSON commands on its stdin, JSON events from its stdout."""

    def __init__(self, kind: str, number: int, run_dir: Path, cfg: JSON) -> None:
        self.name = f"{kind}#{number}"
        config_path = run_dir / f"{kind}-{number}.json"
        config_path.write_text(json.dumps(cfg))
        self.log_path = run_dir / f"{kind}-{number}.log"
        with self.log_path.open("wb") as log_file:
            self.popen = _procs.spawn(
                [sys.executable, __file__, "--worker", kind, "--worker-config", str(config_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
            )
        assert self.popen.stdin is not None
        assert self.popen.stdout is not None
        self._stdin = trio.lowlevel.FdStream(os.dup(self.popen.stdin.fileno()))
        self._stdout = trio.lowlevel.FdStream(os.dup(self.popen.stdout.fileno()))
        self.popen.stdin.close()
        self.popen.stdout.close()
        self._send, self._receive = trio.open_memory_channel[JSON](math.inf)
        self.progress: JSON = {}

    @property
    def pid(self) -> int:
        return self.popen.pid

    def failure(self, what: str) -> RunFailed:
        return RunFailed(
            f"{self.name} (pid {self.pid}) {what}; its log ({self.log_path}):\n{_tail(self.log_path)}"
        )

    async def pump(self) -> None:
        """Read events until the worker's stdout closes (run in a nursery)."""
        reader = LineReader(self._stdout)
        while (event := await reader.read()) is not None:
            if event.get("event") == "progress":
                self.progress = event
            else:
                self._send.send_nowait(event)
        self._send.send_nowait({"event": "eof"})

    async def command(self, cmd: str, **fields: Any) -> None:
        try:
            await self._stdin.send_all(dumps({"cmd": cmd, **fields}))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self.failure(f"went away before {cmd!r}") from exc

    async def expect(self, event: str) -> JSON:
        while True:
            message = await self._receive.receive()
            kind = message.get("event")
            if kind == event:
                return message
            if kind == "error":
                raise self.failure(f"failed: {message.get('message')}")
            if kind == "eof":
                raise self.failure(f"exited (status {self.popen.poll()}) while we waited for {event!r}")

    async def close_stdin(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stdin.aclose()

    async def wait_exit(self, within: float) -> int | None:
        return await wait_process(self.popen, within, grace=2.0)


async def wait_process(
    popen: subprocess.Popen[bytes], within: float, *, grace: float, sig: int = signal.SIGTERM
) -> int | None:
    """Wait up to ``within`` seconds for ``popen`` to exit, then stop it (``_procs.terminate``)."""
    if popen.poll() is None:
        try:
            pidfd = os.pidfd_open(popen.pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            try:
                with trio.move_on_after(within):
                    await trio.lowlevel.wait_readable(pidfd)  # readable once the process exits
            finally:
                os.close(pidfd)
    if popen.poll() is None:
        _procs.terminate(popen, grace=grace, sig=sig)
    return popen.poll()


async def _wait_exit(popen: subprocess.Popen[bytes]) -> None:
    """Return once ``popen`` has exited (a pidfd becomes readable)."""
    pidfd = os.pidfd_open(popen.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def gather(workers: Sequence[Worker], event: str, within: float, what: str) -> list[JSON]:
    """Wait for ``event`` from every worker (for at most ``within`` seconds)."""
    results: list[JSON] = [{} for _ in workers]

    async def one(index: int, worker: Worker) -> None:
        results[index] = await worker.expect(event)

    try:
        with trio.fail_after(within):
            async with trio.open_nursery() as nursery:
                for index, worker in enumerate(workers):
                    nursery.start_soon(one, index, worker)
    except trio.TooSlowError:
        raise RunFailed(f"timed out after {within:g} s waiting for {what}") from None
    except BaseExceptionGroup as group:
        raise leaf(group) from None
    return results


async def broadcast(workers: Sequence[Worker], cmd: str, **fields: Any) -> None:
    for worker in workers:
        await worker.command(cmd, **fields)


@attrs.define
class RelayProcess:
    """A relay under test: ours (``popen``) or an existing one."""

    host: str
    agent_port: int
    viewer_port: int
    pid: int | None
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: Its name in the cluster (``--relay-name``); empty for a relay on its own.
    name: str = ""


def make_tls_files(run_dir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 (cert, key, CA)."""
    try:
        import trustme
    except ImportError:
        raise RunFailed("--tls with our own relay needs trustme (pip install trustme)") from None
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = run_dir / "relay.pem", run_dir / "relay.key", run_dir / "ca.pem"
    with cert_path.open("wb") as file:
        for blob in cert.cert_chain_pems:
            file.write(blob.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return cert_path, key_path, ca_path


def start_relays(
    run_dir: Path, tls: tuple[Path, Path, Path] | None, names: Sequence[str], cluster: str | None
) -> list[RelayProcess]:
    """Relay subprocesses, started together; each one's ready file waited for.

    ``names`` empty-string: one relay on its own (no cluster).  Otherwise each
    relay joins ``cluster`` (a NATS URL) under its name.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPELIVE_")}
    started: list[tuple[str, subprocess.Popen[bytes], Path, Path]] = []
    for name in names:
        stem = f"relay-{name}" if name else "relay"
        ready = run_dir / f"{stem}-ready.json"
        log_path = run_dir / f"{stem}.log"
        argv = [sys.executable, "-m", "loupelive", "--log-level", "INFO", "serve"]
        argv += ["--host", "127.0.0.1", "--agent-port", "0", "--viewer-port", "0", "--ready-file", str(ready)]
        if tls is not None:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        if cluster is not None:
            argv += ["--cluster", cluster, "--relay-name", name]
        with log_path.open("wb") as log_file:
            popen = _procs.spawn(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                deathsig=signal.SIGTERM,
                env=env,
            )
        started.append((name, popen, ready, log_path))
    deadline = time.monotonic() + 30.0
    relays: list[RelayProcess] = []
    for name, popen, ready, log_path in started:
        what = f"the relay {name}" if name else "the relay"
        while not ready.exists():
            if popen.poll() is not None:
                raise RunFailed(f"{what} exited with status {popen.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{what} did not write {ready} within 30 s:\n{_tail(log_path)}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        relays.append(
            RelayProcess(
                host="127.0.0.1",
                agent_port=info["agent_port"],
                viewer_port=info["viewer_port"],
                pid=info["pid"],
                popen=popen,
                log_path=log_path,
                name=name,
            )
        )
    return relays


@attrs.define
class NatsProcess:
    """The ``nats-server`` of a cluster run (ours), with its client and monitoring ports."""

    popen: subprocess.Popen[bytes]
    port: int
    monitor_port: int
    log_path: Path
    version: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def find_nats_server(explicit: str | None) -> str | None:
    """``--nats-server``, else ``nats-server`` on PATH, else the usual places."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("nats-server")
    if found:
        return found
    return next((p for p in NATS_SERVER_FALLBACKS if os.access(p, os.X_OK)), None)


async def start_nats(nursery: trio.Nursery, run_dir: Path, executable: str) -> NatsProcess:
    """One ``nats-server`` on 127.0.0.1, client and monitoring ports chosen by it (``-1``).

    Ready once it says "Server is ready" on stderr; its stderr keeps going to
    ``nats-server.log`` (a task in ``nursery``) until it exits.
    """
    log_path = run_dir / "nats-server.log"
    popen = _procs.spawn(
        [executable, "-a", "127.0.0.1", "-p", "-1", "-m", "-1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert popen.stderr is not None
    stderr = trio.lowlevel.FdStream(os.dup(popen.stderr.fileno()))
    popen.stderr.close()
    try:
        with trio.fail_after(NATS_READY_TIMEOUT):
            found: JSON = await nursery.start(_pump_nats_log, stderr, log_path)
    except trio.TooSlowError:
        raise RunFailed(
            f"nats-server did not say 'Server is ready' within {NATS_READY_TIMEOUT:g} s:\n{_tail(log_path)}"
        ) from None
    if "port" not in found or "monitor_port" not in found:
        raise RunFailed(f"nats-server did not say which ports it listens on:\n{_tail(log_path)}")
    return NatsProcess(popen, found["port"], found["monitor_port"], log_path, found.get("version", ""))


async def _pump_nats_log(
    stream: trio.abc.ReceiveStream, log_path: Path, *, task_status: trio.TaskStatus[JSON]
) -> None:
    """Copy nats-server's stderr to its log; report its ports when it is ready."""
    found: JSON = {}
    started = False
    buffer = bytearray()
    with log_path.open("wb") as log_file:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            log_file.write(data)
            log_file.flush()
            if started:
                continue
            buffer += data
            *lines, rest = bytes(buffer).split(b"\n")
            buffer = bytearray(rest)
            for raw in lines:
                line = raw.decode(errors="replace")
                if "Listening for client connections on " in line:
                    found["port"] = int(line.rsplit(":", 1)[1])
                elif "Starting http monitor on " in line:
                    found["monitor_port"] = int(line.rsplit(":", 1)[1])
                elif "Version:" in line:
                    found["version"] = line.split("Version:", 1)[1].strip()
                elif "Server is ready" in line and not started:
                    started = True
                    task_status.started(found)
    await stream.aclose()
    if not started:
        raise RunFailed(f"nats-server exited before it was ready:\n{_tail(log_path)}")


async def nats_varz(nats: NatsProcess | None) -> JSON | None:
    """The server's counters (``/varz`` of its monitoring port), or None."""
    if nats is None:
        return None
    import urllib.request

    def fetch() -> JSON:
        url = f"http://127.0.0.1:{nats.monitor_port}/varz"
        with urllib.request.urlopen(url, timeout=5.0) as response:
            value = json.loads(response.read())
        assert isinstance(value, dict)
        return value

    try:
        return await trio.to_thread.run_sync(fetch)
    except (OSError, ValueError):
        return None


NATS_COUNTERS: Final = ("in_msgs", "out_msgs", "in_bytes", "out_bytes", "slow_consumers")


def analyze_nats_log(path: Path | None) -> JSON:
    """Counts of nats-server's log lines that matter here."""
    if path is None:
        return {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    patterns = {"slow_consumers": "Slow Consumer", "errors": "[ERR]", "warnings": "[WRN]"}
    counts = {key: sum(1 for line in lines if pattern in line) for key, pattern in patterns.items()}
    samples = [line for line in lines if "[ERR]" in line or "Slow Consumer" in line][:10]
    return {**counts, "lines": len(lines), "samples": samples}


def analyze_relay_logs(paths: Sequence[Path | None]) -> JSON:
    """Counts of the relays' log lines that matter here (our relays only), summed."""
    total: JSON = {}
    for path in paths:
        one = analyze_relay_log(path)
        for key, value in one.items():
            if key == "error_samples":
                total[key] = (total.get(key, []) + value)[:10]
            else:
                total[key] = total.get(key, 0) + value
    return total


def analyze_relay_log(path: Path | None) -> JSON:
    """Counts of the relay's log lines that matter here (our relay only)."""
    if path is None:
        return {}
    patterns = {
        "skips": "viewer ",  # with "is behind", below
        "feed_skips": "cluster: feed of session",  # with "is behind"
        "feed_holes": "lost messages",
        "catch_ups": "caught up at seq",
        "slow_consumer_disconnects": "disconnected: slow consumer",
        "stalled_writes": "peer stopped reading",
        "internal_errors": "internal error",
        "tracebacks": "Traceback (most recent call last)",
        "warnings": " WARNING ",
        "errors": " ERROR ",
    }
    counts = dict.fromkeys(patterns, 0)
    samples: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        for key, pattern in patterns.items():
            if pattern in line and (key not in ("skips", "feed_skips") or "is behind" in line):
                counts[key] += 1
        if (" ERROR " in line or "Traceback" in line) and len(samples) < 10:
            samples.append(line)
    return {**counts, "lines": len(lines), "error_samples": samples}


def worker_log_warnings(paths: Sequence[Path]) -> JSON:
    counts: Counter[str] = Counter()
    samples: list[str] = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            for level in ("WARNING", "ERROR", "Traceback"):
                if level in line:
                    counts[level] += 1
                    if len(samples) < 10:
                        samples.append(line)
    return {"counts": dict(counts), "samples": samples}


class Monitor:
    """Samples the relays (and the workers) from /proc while the run lasts.

    With several relays, a sample is their sum (RSS, peak RSS, CPU), and
    ``peak_rss_kb`` the highest sum sampled; ``each`` holds the last sample
    of every relay and ``peak_each`` each one's highest RSS.
    """

    def __init__(self, relay_pids: Sequence[int]) -> None:
        self.relay_pids = list(relay_pids)
        self.peak_rss_kb = 0
        self.last: _procs.ProcSample | None = None
        self.each: dict[int, _procs.ProcSample] = {}
        self.peak_each: dict[int, int] = {}
        self.workers: dict[int, _procs.ProcSample] = {}
        self.worker_pids: list[int] = []

    def sample(self) -> _procs.ProcSample | None:
        if not self.relay_pids:
            return None
        each = {pid: _procs.proc_sample(pid) for pid in self.relay_pids}
        samples = {pid: s for pid, s in each.items() if s is not None}
        if len(samples) < len(each):
            return None
        self.each = samples
        for pid, one in samples.items():
            self.peak_each[pid] = max(self.peak_each.get(pid, 0), one.rss_kb)
        sample = _procs.ProcSample(
            rss_kb=sum(s.rss_kb for s in samples.values()),
            hwm_kb=sum(s.hwm_kb for s in samples.values()),
            cpu_s=sum(s.cpu_s for s in samples.values()),
        )
        self.last = sample
        self.peak_rss_kb = max(self.peak_rss_kb, sample.rss_kb)
        return sample

    def sample_workers(self) -> None:
        for pid in self.worker_pids:
            sample = _procs.proc_sample(pid)
            if sample is not None:
                self.workers[pid] = sample

    async def run(self) -> None:
        while True:
            self.sample()
            self.sample_workers()
            await trio.sleep(SAMPLE_INTERVAL)


# -- the coordinator: the run -----------------------------------------------------------------


@attrs.define
class Plan:
    """Who runs where."""

    run_id: str
    mode: str
    agents: int
    watched: int
    viewers_per_session: int
    stalled_per_session: int
    agent_procs: int
    viewer_procs: int
    session_ids: list[str]
    #: Relays the clients are spread over (a cluster when more than one).
    relays: int = 1

    @property
    def active_per_session(self) -> int:
        return self.viewers_per_session - self.stalled_per_session

    def for_relays(self, relays: int, tag: str) -> Plan:
        """The same workload over ``relays`` relays, with session ids of its own."""
        run_id = f"{self.run_id}{tag}"
        return attrs.evolve(
            self,
            run_id=run_id,
            relays=relays,
            session_ids=[f"{APP}-{run_id}-{i:05d}" for i in range(self.agents)],
        )

    def agent_specs(self, proc: int) -> list[tuple[int, str, bool, int]]:
        """(index, session id, watched, relay): agent i registers with relay i mod R."""
        return [
            (i, self.session_ids[i], i < self.watched, i % self.relays)
            for i in range(proc, self.agents, self.agent_procs)
        ]

    def viewer_specs(self) -> list[tuple[int, str, bool, int]]:
        """(index, session id, stalled, relay): session i is watched from relay (i + 1) mod R."""
        specs: list[tuple[int, str, bool, int]] = []
        for s in range(self.watched):
            relay = (s + 1) % self.relays
            for j in range(self.viewers_per_session):
                specs.append((len(specs), self.session_ids[s], j < self.stalled_per_session, relay))
        return specs


class Progress:
    """The live line on stderr."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.dirty = False

    def show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text)
            self.dirty = True
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        self.end()
        sys.stderr.write(f"loadtest: {text}\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.dirty:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.dirty = False


class Coordinator:
    """One run of the workload: our relay (or ``relays`` of them in a cluster), agents, viewers."""

    def __init__(
        self,
        args: argparse.Namespace,
        plan: Plan,
        run_dir: Path,
        *,
        cluster: bool = False,
        tls_files: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.args = args
        self.plan = plan
        self.run_dir = run_dir
        self.cluster = cluster
        self.tls_files = tls_files
        self.out = Progress()
        self.relays: list[RelayProcess] = []
        self.nats: NatsProcess | None = None
        self.monitor = Monitor([])
        self.agent_workers: list[Worker] = []
        self.viewer_workers: list[Worker] = []
        #: Counts the cluster's messages that are not feeds (cluster runs).
        self.tap: Worker | None = None
        self.results: JSON = {}
        self.tls_ca: str | None = str(tls_files[2]) if tls_files else args.ca
        self.corpus_source = ""
        self.go_at = 0.0
        self.stopped: list[JSON] = []
        self.stats_viewers: list[loupelive.Viewer | None] = []
        #: The relays before the first agent connects (in a cluster: once they hear each other).
        self.baseline: _procs.ProcSample | None = None
        self.baseline_each: dict[int, _procs.ProcSample] = {}

    @property
    def relay(self) -> RelayProcess | None:
        """The relay (the first one of a cluster)."""
        return self.relays[0] if self.relays else None

    # -- phases ------------------------------------------------------------------------

    def _client_cfg(self) -> JSON:
        assert self.relays
        return {
            "run_id": self.plan.run_id,
            "host": self.relays[0].host,
            "relays": [[r.agent_port, r.viewer_port] for r in self.relays],
            "tls": bool(self.args.tls),
            "ca_file": self.tls_ca,
            "mode": self.plan.mode,
            "corpus": self.args.corpus,
            "consumer_yield": self.args.consumer_yield,
            "per_source": self.args.per_source,
            "unwatched_rate": self.args.unwatched_rate,
            "pause_lists": self.args.pause_lists,
        }

    async def _spawn(self, nursery: trio.Nursery, kind: str, number: int, cfg: JSON) -> Worker:
        worker = Worker(kind, number, self.run_dir, cfg)
        nursery.start_soon(worker.pump)
        self.monitor.worker_pids.append(worker.pid)
        return worker

    async def run(self) -> JSON:
        args, plan = self.args, self.plan
        self.run_dir.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as servers:  # nats-server's log pump
            if self.cluster:
                executable = find_nats_server(args.nats_server)
                assert executable is not None  # checked with the arguments
                self.nats = await start_nats(servers, self.run_dir, executable)
                self.monitor.worker_pids.append(self.nats.popen.pid)
                names = [f"r{i}" for i in range(plan.relays)]
                self.relays = start_relays(self.run_dir, self.tls_files, names, self.nats.url)
                self.out.note(
                    f"nats-server {self.nats.version} pid {self.nats.popen.pid} on {self.nats.url}; "
                    + "; ".join(
                        f"relay {r.name} pid {r.pid}: agents {r.agent_port}, viewers {r.viewer_port}"
                        for r in self.relays
                    )
                    + f"{' (TLS)' if args.tls else ''}; logs in {self.run_dir}"
                )
            else:
                if args.relay is None:
                    self.relays = start_relays(self.run_dir, self.tls_files, [""], None)
                else:
                    host, port = args.relay
                    viewer_port = args.viewer_port or port + 1
                    self.relays = [RelayProcess(host, port, viewer_port, _procs.listening_pid(port))]
                relay = self.relays[0]
                self.out.note(
                    f"relay {'pid ' + str(relay.pid) if relay.pid else '(pid not visible)'} on "
                    f"{relay.host}: agents {relay.agent_port}, viewers {relay.viewer_port}"
                    f"{' (TLS)' if args.tls else ''}; logs in {self.run_dir}"
                )
            self.monitor.relay_pids = [r.pid for r in self.relays if r.pid is not None]
            self.baseline = self.monitor.sample()
            self.baseline_each = dict(self.monitor.each)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.monitor.run)
                for relay in self.relays:
                    nursery.start_soon(self._watch_relay, relay)
                if self.nats is not None:
                    nursery.start_soon(self._watch_nats, self.nats)
                try:
                    await self._run_load(nursery)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._finish_workers()
                nursery.cancel_scope.cancel()
            self.results.setdefault("relay_samples_each", {})["baseline"] = {
                pid: attrs.asdict(sample) for pid, sample in self.baseline_each.items()
            }
            relay_exit = await self._stop_relays()
            self.results["relay_exit_status"] = relay_exit[0] if len(relay_exit) == 1 else relay_exit
            if self.nats is not None:
                popen = self.nats.popen
                if popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(popen.pid, signal.SIGTERM)
                self.results["nats_exit_status"] = await wait_process(
                    popen, 10.0, grace=1.0, sig=signal.SIGKILL
                )
            servers.cancel_scope.cancel()
        plain = None
        if (
            plan.mode != "idle"
            and not args.no_plain
            and not args.cluster
            and plan.watched
            and plan.active_per_session
        ):
            plain = await self._run_plain()
        self.results["plain"] = plain
        return self.results

    async def _run_load(self, nursery: trio.Nursery) -> None:
        args, plan = self.args, self.plan
        setup_timeout = 60.0 + plan.agents * 0.02 + plan.watched * plan.viewers_per_session * 0.05
        cluster_setup: JSON = {}
        if args.cluster:
            # Both runs of a comparison hold their statistics viewers from the
            # start (a cluster run needs them to see the peers and the lists).
            await self._open_stats_viewers(nursery)
        if self.cluster:
            t_peers = time.monotonic()
            await self._wait_peers()
            cluster_setup["peers_s"] = time.monotonic() - t_peers
            # The baseline of a cluster relay: with NATS connected and its peers known.
            self.baseline = self.monitor.sample()
            self.baseline_each = dict(self.monitor.each)
            assert self.nats is not None
            self.tap = await self._spawn(
                nursery, "nats-tap", 0, {"url": self.nats.url, "prefix": "loupelive"}
            )
            await gather([self.tap], "ready", 30.0, "the NATS tap to subscribe")
            self.out.note(
                f"every relay hears its {plan.relays - 1} peers after {cluster_setup['peers_s']:.2f} s"
            )
        t0 = time.monotonic()
        for proc in range(plan.agent_procs):
            cfg = {**self._client_cfg(), "agents": plan.agent_specs(proc)}
            self.agent_workers.append(await self._spawn(nursery, "agents", proc, cfg))
        ready = await gather(self.agent_workers, "ready", setup_timeout, "the agents to register")
        self.corpus_source = next((r["corpus"] for r in ready if r.get("corpus")), "")
        registered_at = time.monotonic()
        retries = sum(r.get("retries", 0) for r in ready)
        for r in ready:
            for index, session_id in r.get("renamed", {}).items():
                plan.session_ids[int(index)] = session_id
        self.results["registration"] = {"seconds": registered_at - t0, "retries": retries}
        self.out.note(
            f"{plan.agents} sessions registered in {registered_at - t0:.1f} s"
            + (f" ({retries} registrations retried)" if retries else "")
        )
        if self.cluster:
            await self._wait_directory(setup_timeout)
            cluster_setup["directory_s"] = time.monotonic() - registered_at
            self.out.note(
                f"every relay lists all {plan.agents} sessions {cluster_setup['directory_s']:.2f} s "
                "after the last registration"
            )
        self.results["cluster_setup"] = cluster_setup or None
        registered = self.monitor.sample()
        registered_each = dict(self.monitor.each)
        viewer_specs = plan.viewer_specs()
        if viewer_specs:
            t1 = time.monotonic()
            procs = min(plan.viewer_procs, len(viewer_specs))
            for proc in range(procs):
                cfg = {**self._client_cfg(), "viewers": viewer_specs[proc::procs]}
                self.viewer_workers.append(await self._spawn(nursery, "viewers", proc, cfg))
            await gather(self.viewer_workers, "ready", setup_timeout, "the viewers to subscribe")
            await self._warm_up()
            self.out.note(f"{len(viewer_specs)} viewers subscribed and live in {time.monotonic() - t1:.1f} s")
        if not self.stats_viewers:
            await self._open_stats_viewers(nursery)
        if args.pause_lists:
            for viewer in self.stats_viewers:
                if viewer is not None:
                    await viewer.pause_list()
        if args.settle:
            # Out of the window: the relay's first clock probes (four in the
            # first 2 s of every agent connection) and their list updates.
            await trio.sleep(args.settle)
        stats_go = await self._relay_stats()
        varz_go = await nats_varz(self.nats)
        self.go_at = time.time() + 0.5
        await broadcast(self.agent_workers, "go", start_at=self.go_at, seconds=args.seconds, rate=args.rate)
        await sleep_until_wall(self.go_at)
        if self.tap is not None:
            await self.tap.command("start")
        before_go = self.monitor.sample()
        before_go_each = dict(self.monitor.each)
        self.monitor.sample_workers()
        workers_before = dict(self.monitor.workers)
        async with trio.open_nursery() as progress_nursery:
            progress_nursery.start_soon(self._progress)
            self.stopped = await gather(
                self.agent_workers, "stopped", args.seconds + 60.0, "the agents to finish logging"
            )
            ranges: dict[str, list[int]] = {}
            for stopped in self.stopped:
                ranges.update(stopped["ranges"])
            drained: list[JSON] = []
            stalled_final: list[JSON] = []
            if self.viewer_workers:
                await broadcast(
                    self.viewer_workers, "expect", ranges=ranges, drain_timeout=args.drain_timeout
                )
                drained = await gather(
                    self.viewer_workers, "drained", args.drain_timeout + 30.0, "the viewers to drain"
                )
            end_sample = self.monitor.sample()
            end_each = dict(self.monitor.each)
            end_time = time.time()
            self.monitor.sample_workers()
            workers_after = dict(self.monitor.workers)
            progress_nursery.cancel_scope.cancel()
        stats_end = await self._relay_stats()
        varz_end = await nats_varz(self.nats)
        tap_window = None
        if self.tap is not None:
            await self.tap.command("stop")
            tap_window = (await gather([self.tap], "window", 30.0, "the NATS tap's counts"))[0]
        self.out.end()
        if self.viewer_workers:
            stalled_final = await gather(
                self.viewer_workers, "final", args.drain_timeout + 30.0, "the viewers' reports"
            )
        await broadcast(self.agent_workers, "finish")
        agent_final = await gather(self.agent_workers, "final", 60.0, "the agents' reports")
        done_times = [d["done_at"] for d in drained if d.get("done_at") is not None]

        def each(samples: dict[int, _procs.ProcSample]) -> dict[int, JSON]:
            return {pid: attrs.asdict(sample) for pid, sample in samples.items()}

        self.results.update(
            {
                "ranges": ranges,
                "drained": drained,
                "viewer_final": stalled_final,
                "agent_final": agent_final,
                "delivery_end": max(done_times) if done_times else None,
                "measure_end": end_time,
                "relay_statistics": {"at_go": stats_go, "at_end": stats_end},
                "nats_varz": {"at_go": varz_go, "at_end": varz_end},
                "nats_tap": tap_window,
                "relay_samples": {
                    "baseline": attrs.asdict(self.baseline) if self.baseline else None,
                    "registered": attrs.asdict(registered) if registered else None,
                    "before_go": attrs.asdict(before_go) if before_go else None,
                    "end": attrs.asdict(end_sample) if end_sample else None,
                    "peak_rss_kb": self.monitor.peak_rss_kb or None,
                },
                "relay_samples_each": {
                    "registered": each(registered_each),
                    "before_go": each(before_go_each),
                    "end": each(end_each),
                    "peak_rss_kb": dict(self.monitor.peak_each),
                },
                "worker_cpu_s": {
                    "agents": _cpu_delta(workers_before, workers_after, [w.pid for w in self.agent_workers]),
                    "viewers": _cpu_delta(
                        workers_before, workers_after, [w.pid for w in self.viewer_workers]
                    ),
                    "nats": _cpu_delta(workers_before, workers_after, [self.nats.popen.pid])
                    if self.nats
                    else None,
                },
                "worker_peak_rss_kb": {
                    "agents": [
                        workers_after[w.pid].hwm_kb for w in self.agent_workers if w.pid in workers_after
                    ],
                    "viewers": [
                        workers_after[w.pid].hwm_kb for w in self.viewer_workers if w.pid in workers_after
                    ],
                    "nats": workers_after[self.nats.popen.pid].hwm_kb
                    if self.nats and self.nats.popen.pid in workers_after
                    else None,
                },
            }
        )

    async def _open_stats_viewers(self, nursery: trio.Nursery) -> None:
        self.stats_viewers = [await nursery.start(self._hold_stats_viewer, relay) for relay in self.relays]

    async def _hold_stats_viewer(
        self,
        relay: RelayProcess,
        *,
        task_status: trio.TaskStatus[loupelive.Viewer | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """A viewer connection of our own, to ask a relay for its statistics (and its list)."""
        started = False
        try:
            async with loupelive.open_viewer(
                relay.host, relay.viewer_port, tls=bool(self.args.tls), ca_file=self.tls_ca
            ) as viewer:
                task_status.started(viewer)
                started = True
                await trio.sleep_forever()
        except (OSError, LoupeError) as exc:
            self.out.note(f"relay statistics unavailable: {describe(exc)}")
            if not started:
                task_status.started(None)

    async def _relay_stats(self) -> list[JSON | None]:
        """``Viewer.statistics()`` of each relay (None where it cannot be had), asked together."""
        results: list[JSON | None] = [None] * len(self.stats_viewers)

        async def one(index: int, viewer: loupelive.Viewer) -> None:
            try:
                with trio.fail_after(15.0):
                    results[index] = await viewer.statistics()
            except (LoupeError, AttributeError, trio.TooSlowError) as exc:
                self.out.note(f"relay statistics unavailable: {describe(exc)}")

        async with trio.open_nursery() as nursery:
            for index, viewer in enumerate(self.stats_viewers):
                if viewer is not None:
                    nursery.start_soon(one, index, viewer)
        return results

    async def _wait_peers(self) -> None:
        """Until every relay's statistics list every other relay as a peer."""
        names = {r.name for r in self.relays}
        if any(v is None for v in self.stats_viewers):
            raise RunFailed("a relay of the cluster does not answer statistics requests")
        with trio.move_on_after(PEERS_TIMEOUT):
            while True:
                stats = await self._relay_stats()
                missing = {
                    relay.name: sorted(
                        names - {relay.name} - set((s or {}).get("cluster", {}).get("peers", []))
                    )
                    for relay, s in zip(self.relays, stats, strict=True)
                }
                if not any(missing.values()):
                    return
                await trio.sleep(PEERS_POLL)
        raise RunFailed(
            f"the relays did not all hear each other within {PEERS_TIMEOUT:g} s: missing {missing}"
        )

    async def _wait_directory(self, within: float) -> None:
        """Until every relay lists every session of the run (the directory has converged)."""
        wanted = set(self.plan.session_ids)
        count = len(wanted)

        def complete(sessions: list[Any]) -> bool:
            return len(sessions) >= count and wanted.issubset(s.session_id for s in sessions)

        try:
            with trio.fail_after(within):
                async with trio.open_nursery() as nursery:
                    for viewer in self.stats_viewers:
                        assert viewer is not None
                        nursery.start_soon(viewer.wait_sessions, complete)
        except trio.TooSlowError:
            seen = [
                len(wanted & {s.session_id for s in v.sessions()}) if v is not None else None
                for v in self.stats_viewers
            ]
            raise RunFailed(
                f"the relays' lists did not converge within {within:g} s: "
                f"of {count} sessions, relays {[r.name for r in self.relays]} list {seen}"
            ) from None

    async def _warm_up(self) -> None:
        """Probe records until every viewer (stalled ones included) has received one."""

        async def probe() -> None:
            while True:
                await broadcast(self.agent_workers, "probe")
                await trio.sleep(PROBE_INTERVAL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            await gather(self.viewer_workers, "live", 60.0, "every viewer to receive a probe record")
            nursery.cancel_scope.cancel()
        await trio.sleep(0.3)  # the last probes drain

    async def _progress(self) -> None:
        last_delivered = 0
        last_t = self.go_at
        tick = self.go_at + 0.25  # just after the workers' own once-a-second reports
        what = "relay" if len(self.relays) == 1 else f"{len(self.relays)} relays"
        while True:
            tick += PROGRESS_INTERVAL
            await sleep_until_wall(tick)
            now = time.time()
            sample = self.monitor.last
            relay = (
                f"{what} RSS {sample.rss_kb / 1024:.0f} MiB CPU {sample.cpu_s:.1f} s"
                if sample
                else f"{what} n/a"
            )
            elapsed = now - self.go_at
            if self.plan.mode == "idle":
                self.out.show(f"[{elapsed:5.1f} s] {self.plan.agents} idle sessions | {relay}")
                continue
            logged = sum(w.progress.get("logged", 0) for w in self.agent_workers)
            delivered = sum(w.progress.get("delivered", 0) for w in self.viewer_workers)
            gaps = sum(w.progress.get("gaps", 0) for w in self.viewer_workers)
            errors = sum(w.progress.get("errors", 0) for w in self.viewer_workers)
            rate = (delivered - last_delivered) / max(now - last_t, 1e-9)
            last_delivered, last_t = delivered, now
            self.out.show(
                f"[{elapsed:5.1f} s] {rate:9,.0f} records/s | logged {logged:,} | delivered {delivered:,} "
                f"| gaps {gaps:,} | errors {errors} | {relay}"
            )

    async def _watch_relay(self, relay: RelayProcess) -> None:
        """Fail the run at once if one of our relays dies under load."""
        if relay.popen is None:
            return
        await _wait_exit(relay.popen)
        status = relay.popen.wait()
        log_tail = _tail(relay.log_path) if relay.log_path else ""
        what = f"the relay {relay.name}" if relay.name else "the relay"
        raise RunFailed(
            f"{what} (pid {relay.popen.pid}) exited with status {status} during the run:\n{log_tail}"
        )

    async def _watch_nats(self, nats: NatsProcess) -> None:
        await _wait_exit(nats.popen)
        status = nats.popen.wait()
        raise RunFailed(f"nats-server exited with status {status} during the run:\n{_tail(nats.log_path)}")

    async def _finish_workers(self) -> None:
        workers = self.viewer_workers + self.agent_workers + ([self.tap] if self.tap else [])
        for worker in workers:
            with contextlib.suppress(RunFailed):
                await worker.command("finish")
        for worker in workers:
            await worker.close_stdin()
            await worker.wait_exit(20.0)

    async def _stop_relays(self) -> list[int | None]:
        """SIGTERM to each of our relays, all at once; their exit statuses."""
        statuses: list[int | None] = [None] * len(self.relays)

        async def stop(index: int, popen: subprocess.Popen[bytes]) -> None:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGTERM)
            statuses[index] = await wait_process(popen, 15.0, grace=1.0, sig=signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            for index, relay in enumerate(self.relays):
                if relay.popen is not None:
                    nursery.start_soon(stop, index, relay.popen)
        return statuses

    async def _run_plain(self) -> JSON | None:
        """The same bytes through a plain TCP fan-out with the same process layout."""
        plan = self.plan
        sessions: dict[str, JSON] = {}
        for final in self.results["agent_final"]:
            for report in final["agents"]:
                sessions[report["session"]] = report
        index = {sid: i for i, sid in enumerate(plan.session_ids[: plan.watched])}
        senders = []
        for sid, report in sessions.items():
            if report["bytes_sent"] > 0 and report["batches_sent"] > 0:
                chunk = max(1, round(report["bytes_sent"] / report["batches_sent"]))
                senders.append(
                    {"index": index[sid], "bytes": report["bytes_sent"], "chunk": chunk, "sid": sid}
                )
        if not senders:
            return None
        sending = {s["sid"] for s in senders}
        receivers = [
            {"index": index[sid], "bytes": sessions[sid]["bytes_sent"]}
            for _, sid, stalled, _relay in plan.viewer_specs()
            if not stalled and sid in sending
        ]
        rounds = self.args.plain_rounds
        total = sum(s["bytes"] for s in senders)
        workers: list[Worker] = []
        times: list[float] = []
        self.out.note(
            f"plain fan-out: {len(senders)} senders, {len(receivers)} receivers, {total / 1e6:.2f} MB "
            f"per round, {rounds} rounds"
        )
        try:
            async with trio.open_nursery() as nursery:
                forwarder = await self._spawn(
                    nursery, "plain-relay", 0, {"senders": len(senders), "receivers": len(receivers)}
                )
                workers.append(forwarder)
                port = (await gather([forwarder], "ready", 30.0, "the plain forwarder"))[0]["port"]
                recv_procs = min(plan.viewer_procs, len(receivers))
                recv_workers = [
                    await self._spawn(
                        nursery,
                        "plain-recv",
                        p,
                        {"port": port, "rounds": rounds, "receivers": receivers[p::recv_procs]},
                    )
                    for p in range(recv_procs)
                ]
                send_procs = min(plan.agent_procs, len(senders))
                send_workers = [
                    await self._spawn(
                        nursery, "plain-send", p, {"port": port, "senders": senders[p::send_procs]}
                    )
                    for p in range(send_procs)
                ]
                workers += recv_workers + send_workers
                await gather(recv_workers + send_workers, "ready", 60.0, "the plain fan-out to connect")
                await gather([forwarder], "connected", 60.0, "the plain forwarder's connections")
                for round_no in range(rounds):
                    start_at = time.time() + 0.1
                    await broadcast(send_workers, "go", start_at=start_at, round=round_no)
                    done = await gather(recv_workers, "round_done", 300.0, "a plain transfer")
                    await gather(send_workers, "sent", 60.0, "the plain senders")
                    times.append(max(d["done_at"] for d in done) - start_at)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for worker in workers:
                    with contextlib.suppress(RunFailed):
                        await worker.command("finish")
                    await worker.close_stdin()
                    await worker.wait_exit(10.0)
        seconds = statistics.median(times)
        return {
            "senders": len(senders),
            "receivers": len(receivers),
            "sender_procs": min(plan.agent_procs, len(senders)),
            "receiver_procs": min(plan.viewer_procs, len(receivers)),
            "bytes_per_round": total,
            "bytes_out_per_round": sum(r["bytes"] for r in receivers),
            "rounds": rounds,
            "seconds": seconds,
            "seconds_all": times,
            "bytes_per_s": total / seconds,
        }


def _cpu_delta(
    before: dict[int, _procs.ProcSample], after: dict[int, _procs.ProcSample], pids: Sequence[int]
) -> float | None:
    deltas = [after[p].cpu_s - before[p].cpu_s for p in pids if p in before and p in after]
    return sum(deltas) if deltas else None


# -- results ----------------------------------------------------------------------------------


def build_results(args: argparse.Namespace, plan: Plan, coord: Coordinator, raw: JSON) -> JSON:
    mode = plan.mode
    ranges: dict[str, list[int]] = raw["ranges"]
    expected = {sid: last - first + 1 for sid, (first, last) in ranges.items()}
    records_sent = sum(max(0, n) for n in expected.values())
    viewers: list[JSON] = [v for final in raw["viewer_final"] for v in final["viewers"]]
    active = [v for v in viewers if not v["stalled"]]
    stalled = [v for v in viewers if v["stalled"]]
    latency = Histogram()
    latency_stalled = Histogram()
    for final in raw["viewer_final"]:
        latency.merge(Histogram.from_json(final["latency"]))
        latency_stalled.merge(Histogram.from_json(final["latency_stalled"]))

    def totals(group: list[JSON]) -> JSON:
        gaps: Counter[str] = Counter()
        gap_seqs: Counter[str] = Counter()
        for v in group:
            gaps.update(v["gaps"])
            gap_seqs.update(v["gap_seqs"])
        delivered = sum(v["delivered"] for v in group)
        return {
            "viewers": len(group),
            "delivered": delivered,
            "lost": sum(max(0, expected.get(v["session"], 0) - v["delivered"]) for v in group),
            "duplicated": sum(v["duplicates"] for v in group),
            "unexplained_holes": sum(v["unexplained_holes"] for v in group),
            "missing_gaps": sum(v["missing_gaps"] for v in group),
            "missing_seqs": sum(v["missing_seqs"] for v in group),
            "gaps": sum(gaps.values()),
            "gaps_by_reason": dict(gaps),
            "gap_seqs_by_reason": dict(gap_seqs),
            "incomplete": sum(1 for v in group if not v["complete"]),
            "close_codes": dict(Counter(v["close_code"] for v in group if v["close_code"])),
            "errors": [f"viewer {v['index']} ({v['session']}): {v['error']}" for v in group if v["error"]],
        }

    act = totals(active)
    stl = totals(stalled)
    go_at = coord.go_at
    delivery_end = raw["delivery_end"]
    elapsed = (delivery_end - go_at) if delivery_end is not None else raw["measure_end"] - go_at
    agents = [a for final in raw["agent_final"] for a in final["agents"]]
    bytes_sent = sum(a["bytes_sent"] for a in agents)
    agent_records_sent = sum(a["records_sent"] for a in agents)
    batches_sent = sum(a["batches_sent"] for a in agents)
    json_bytes = sum(a["json_bytes"] for a in agents)
    logged = sum(a["logged"] for a in agents)
    samples = raw["relay_samples"]
    base = samples["baseline"]
    peak = samples["peak_rss_kb"]
    cpu = None
    if samples["before_go"] and samples["end"]:
        cpu = samples["end"]["cpu_s"] - samples["before_go"]["cpu_s"]
    # Idle traffic: control connections of the sessions nobody watches.
    control_bytes = sum(s["control"]["unwatched"]["bytes"] for s in coord.stopped)
    control_sessions = sum(s["control"]["unwatched"]["sessions"] for s in coord.stopped)
    window = max((s["window_s"] for s in coord.stopped), default=0.0)
    idle_rate = (
        control_bytes / window / control_sessions
        if control_sessions and window and not args.unwatched_rate
        else None
    )
    plain = raw.get("plain")
    relay_rate = bytes_sent / elapsed if elapsed > 0 and bytes_sent else None
    relay_vs_plain = relay_rate / plain["bytes_per_s"] if plain and relay_rate else None
    relay_log = analyze_relay_logs([r.log_path for r in coord.relays])
    relay_stats = sum_relay_statistics(raw["relay_statistics"]["at_go"], raw["relay_statistics"]["at_end"])
    worker_logs = worker_log_warnings([w.log_path for w in coord.agent_workers + coord.viewer_workers])

    failures: list[str] = []
    if act["missing_seqs"] or act["unexplained_holes"]:
        failures.append(
            f"{act['missing_seqs'] + act['unexplained_holes']} seqs missing without a legitimate gap "
            f"({act['missing_gaps']} 'missing' gaps) at active viewers"
        )
    if act["duplicated"]:
        failures.append(f"{act['duplicated']} duplicated or out-of-order seqs at active viewers")
    if act["incomplete"]:
        failures.append(f"{act['incomplete']} active viewers did not cover their session's last seq")
    failures += act["errors"]
    if stl["missing_seqs"] or stl["unexplained_holes"] or stl["duplicated"]:
        failures.append(
            f"stalled viewers: {stl['missing_seqs'] + stl['unexplained_holes']} unexplained missing seqs, "
            f"{stl['duplicated']} duplicates"
        )
    # A stalled viewer's connection ending (slow_consumer, a reset after the
    # relay's send deadline) is what stalling leads to: reported, not a failure.
    if relay_log.get("internal_errors") or relay_log.get("tracebacks"):
        failures.append(
            f"the relay logged {relay_log['internal_errors']} internal errors / {relay_log['tracebacks']} tracebacks"
        )
    if any("Traceback" in line for line in worker_logs["samples"]):
        failures.append("a worker logged a traceback")
    if mode != "idle" and records_sent == 0:
        failures.append("no records were logged")
    cluster = None
    if coord.cluster:
        cluster = cluster_figures(coord, raw, records_sent, act["delivered"], elapsed)
        if cluster["nats_log"].get("errors"):
            failures.append(f"nats-server logged {cluster['nats_log']['errors']} errors")

    results: JSON = {
        "mode": mode,
        "relays": plan.relays,
        "agents": plan.agents,
        "watched": plan.watched,
        "viewers": plan.watched * plan.viewers_per_session,
        "viewers_per_session": plan.viewers_per_session,
        "active_viewers": len(active),
        "stalled_viewers": len(stalled),
        "seconds": args.seconds,
        "rate": args.rate if mode == "trickle" else None,
        "unwatched_rate": args.unwatched_rate or None,
        "pause_lists": bool(args.pause_lists),
        "elapsed_s": elapsed,
        "records_sent": records_sent,
        "records_delivered": act["delivered"],
        "records_lost": act["lost"],
        "records_duplicated": act["duplicated"],
        "gaps": act["gaps"],
        "gaps_by_reason": act["gaps_by_reason"],
        "gap_seqs_by_reason": act["gap_seqs_by_reason"],
        "cluster_overflow_gaps": act["gaps_by_reason"].get("cluster_overflow", 0),
        "cluster_overflow_seqs": act["gap_seqs_by_reason"].get("cluster_overflow", 0),
        "delivered_records_per_s": act["delivered"] / elapsed if elapsed > 0 and mode != "idle" else None,
        "delivered_records_per_s_per_viewer": act["delivered"] / elapsed / len(active)
        if elapsed > 0 and active
        else None,
        "wire_bytes_per_record": bytes_sent / agent_records_sent if agent_records_sent else None,
        "json_bytes_per_record": json_bytes / logged if logged else None,
        "latency_ms": latency.summary(),
        "relay_rss_mb": peak / 1024 if peak else None,
        "relay_cpu_s": cpu,
        "idle_bytes_per_s_per_session": idle_rate,
        "idle_segments_estimate": _segments_estimate(idle_rate, coord),
        "relay_rss_kb_per_session": (peak - base["rss_kb"]) / plan.agents if peak and base else None,
        "relay_vs_plain": relay_vs_plain,
        "ok": not failures,
        "failures": failures,
        "stalled": {
            "viewers": len(stalled),
            "records_delivered": stl["delivered"],
            "records_lost": stl["lost"],
            "gaps_by_reason": stl["gaps_by_reason"],
            "gap_seqs_by_reason": stl["gap_seqs_by_reason"],
            # As the viewer client saw it (a CLOSE slow_consumer) …
            "slow_consumer_disconnects": stl["close_codes"].get("slow_consumer", 0),
            # … and as our relay logged it (the CLOSE may never reach a viewer
            # that reads nothing for longer than the relay's send_timeout).
            "slow_consumer_disconnects_relay_log": relay_log.get("slow_consumer_disconnects"),
            "relay_skips_logged": relay_log.get("skips"),
            "close_codes": stl["close_codes"],
            "errors": stl["errors"],
            "reached_last_seq": len(stalled) - stl["incomplete"],
            "latency_ms": latency_stalled.summary(),
        },
        "agents_detail": {
            "records_logged": logged,
            "records_sent_on_wire": agent_records_sent,
            "records_dropped_by_ring_buffer": sum(a["records_dropped"] for a in agents),
            "bytes_sent": bytes_sent,
            "batches_sent": batches_sent,
            "records_per_batch": agent_records_sent / batches_sent if batches_sent else None,
            "bytes_per_batch": bytes_sent / batches_sent if batches_sent else None,
            "json_bytes": json_bytes,
            "control_bytes_unwatched": control_bytes,
            "control_bytes_unwatched_sent_by_agents": sum(
                s["control"]["unwatched"]["sent"] for s in coord.stopped
            ),
            "control_bytes_unwatched_sent_by_relay": sum(
                s["control"]["unwatched"]["received"] for s in coord.stopped
            ),
            "control_sessions_measured": control_sessions,
            "control_sessions_reconnected": sum(s["control"]["unwatched"]["lost"] for s in coord.stopped),
            "control_bytes_watched": sum(s["control"]["watched"]["bytes"] for s in coord.stopped),
            "window_s": window,
        },
        "relay": {
            "pid": (coord.relay.pid if coord.relay else None)
            if len(coord.relays) <= 1
            else [r.pid for r in coord.relays],
            "started_by_loadtest": bool(coord.relay and coord.relay.popen),
            "tls": bool(args.tls),
            "rss_kb": samples,
            "rss_kb_per_session_registered": (samples["registered"]["rss_kb"] - base["rss_kb"]) / plan.agents
            if samples["registered"] and base
            else None,
            "cpu_share": cpu / elapsed if cpu is not None and elapsed > 0 else None,
            "bytes_in_per_s": relay_rate,
            "bytes_out_per_s": relay_rate * plan.active_per_session if relay_rate else None,
            "exit_status": raw.get("relay_exit_status"),
            "statistics": relay_stats,
            "log": relay_log,
        },
        "cluster": cluster,
        "plain": plain,
        "workers": {
            "agent_procs": plan.agent_procs,
            "viewer_procs": len(coord.viewer_workers),
            "cpu_s": raw["worker_cpu_s"],
            "peak_rss_kb": raw["worker_peak_rss_kb"],
            "log_warnings": worker_logs,
        },
        "corpus": coord.corpus_source,
        "registration": raw.get("registration"),
        "consumer_yield": args.consumer_yield,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }
    return results


RELAY_COUNTERS: Final = (
    "batches_in",
    "records_in",
    "bytes_in",
    "raw_bytes_in",
    "bytes_out",
    "records_dropped",
    "batches_dropped",
    "gaps_sent",
    "slow_consumer_disconnects",
)
RELAY_GAUGES: Final = (
    "sessions",
    "streaming_sessions",
    "disconnected_sessions",
    "connections",
    "queued_bytes",
)


CLUSTER_COUNTERS: Final = (
    "feed_bytes_out",
    "feed_bytes_in",
    "feed_messages_in",
    "cluster_overflows",
    "cluster_overflow_gaps",
    "feed_holes",
    "nats_published",
    "nats_received",
    "nats_inbox_drops",
    "nats_reconnects",
)
CLUSTER_GAUGES: Final = ("connected", "peers", "remote_sessions", "feeds", "nats_pending_bytes")


def sum_relay_statistics(at_go: Sequence[JSON | None], at_end: Sequence[JSON | None]) -> JSON | None:
    """``relay_statistics_delta`` summed over the relays (None if one does not answer)."""
    deltas = [relay_statistics_delta(g, e) for g, e in zip(at_go, at_end, strict=True)]
    if not deltas or any(d is None for d in deltas):
        return None
    if len(deltas) == 1:
        return deltas[0]
    total: JSON = {"delta": {}, "at_end": {}, "rss_mb_at_end": 0.0}
    for d in deltas:
        assert d is not None
        for key, value in d["delta"].items():
            if isinstance(value, dict):
                merged = total["delta"].setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                total["delta"][key] = total["delta"].get(key, 0) + value
        for key, value in d["at_end"].items():
            total["at_end"][key] = (total["at_end"].get(key) or 0) + (value or 0)
        total["rss_mb_at_end"] = (
            total["rss_mb_at_end"] + d["rss_mb_at_end"] if d["rss_mb_at_end"] is not None else None
        )
        if total["rss_mb_at_end"] is None:
            break
    return total


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def cluster_figures(
    coord: Coordinator, raw: JSON, records_sent: int, records_delivered: int, elapsed: float
) -> JSON:
    """What crossed NATS, per relay and in all, over the measurement (go → end of delivery)."""
    plan = coord.plan
    at_go: list[JSON | None] = raw["relay_statistics"]["at_go"]
    at_end: list[JSON | None] = raw["relay_statistics"]["at_end"]
    samples = raw["relay_samples_each"]
    per_relay: list[JSON] = []
    totals: Counter[str] = Counter()
    for index, relay in enumerate(coord.relays):
        go, end = at_go[index] or {}, at_end[index] or {}
        cgo, cend = go.get("cluster") or {}, end.get("cluster") or {}
        delta = {k: cend[k] - cgo[k] for k in CLUSTER_COUNTERS if k in cgo and k in cend}
        totals.update(delta)
        pid = relay.pid
        before, after = samples["before_go"].get(pid), samples["end"].get(pid)
        base, registered = samples["baseline"].get(pid), samples["registered"].get(pid)
        peak = samples["peak_rss_kb"].get(pid)
        per_relay.append(
            {
                "name": relay.name,
                "pid": pid,
                "agents": sum(1 for i in range(plan.agents) if i % plan.relays == index),
                "viewers": sum(1 for spec in plan.viewer_specs() if spec[3] == index),
                "cpu_s": after["cpu_s"] - before["cpu_s"] if before and after else None,
                "rss_mb_baseline": base["rss_kb"] / 1024 if base else None,
                "rss_mb_registered": registered["rss_kb"] / 1024 if registered else None,
                "rss_mb_peak": peak / 1024 if peak else None,
                "cluster_delta": delta,
                "cluster_at_end": {k: cend.get(k) for k in CLUSTER_GAUGES},
                "statistics": relay_statistics_delta(at_go[index], at_end[index]),
            }
        )
    varz_go, varz_end = raw["nats_varz"]["at_go"], raw["nats_varz"]["at_end"]
    varz = (
        {k: varz_end[k] - varz_go[k] for k in NATS_COUNTERS if k in varz_go and k in varz_end}
        if varz_go and varz_end
        else None
    )
    feed_out = totals.get("feed_bytes_out")
    nats_in = varz.get("in_bytes") if varz else None
    nats_cpu = raw["worker_cpu_s"].get("nats")
    other_in = nats_in - feed_out if nats_in is not None and feed_out is not None else None
    nats = coord.nats
    tap = raw.get("nats_tap")
    directory = None
    if tap and tap["seconds"] > 0:
        seconds = tap["seconds"]
        directory = {
            "seconds": seconds,
            "msgs": tap["msgs"],
            "bytes": tap["bytes"],
            "entries": tap["entries"],
            "bytes_per_s": {k: v / seconds for k, v in sorted(tap["bytes"].items())},
            "total_bytes_per_s": sum(tap["bytes"].values()) / seconds,
            "bytes_per_counts_entry": _ratio(
                tap["bytes"].get("dir.counts"), tap["entries"].get("dir.counts")
            ),
            "bytes_per_alive": _ratio(tap["bytes"].get("alive"), tap["msgs"].get("alive")),
            "totals_since_tap_start": {"msgs": tap["msgs_total"], "bytes": tap["bytes_total"]},
        }
    return {
        "relays": plan.relays,
        "names": [r.name for r in coord.relays],
        "setup": raw.get("cluster_setup"),
        "statistics": dict(totals),
        "feed_bytes_out_per_delivered_record": _ratio(feed_out, records_delivered),
        "feed_bytes_out_per_sent_record": _ratio(feed_out, records_sent),
        "feed_bytes_out_per_s": _ratio(feed_out, elapsed),
        "nats_server": {
            "version": nats.version if nats else None,
            "pid": nats.popen.pid if nats else None,
            "cpu_s": nats_cpu,
            "cpu_share": _ratio(nats_cpu, elapsed),
            "peak_rss_mb": raw["worker_peak_rss_kb"]["nats"] / 1024
            if raw["worker_peak_rss_kb"].get("nats")
            else None,
            "varz_delta": varz,
            "in_bytes_per_delivered_record": _ratio(nats_in, records_delivered),
            "out_bytes_per_delivered_record": _ratio(
                varz.get("out_bytes") if varz else None, records_delivered
            ),
            "in_bytes_per_s": _ratio(nats_in, elapsed),
            "out_bytes_per_s": _ratio(varz.get("out_bytes") if varz else None, elapsed),
            # Everything published that is not a feed: alive, directory, sync, ctl.
            "other_in_bytes": other_in,
            "other_in_bytes_per_s": _ratio(other_in, elapsed),
            "other_in_bytes_per_s_per_session": _ratio(_ratio(other_in, elapsed), plan.agents),
        },
        "directory": directory,
        "nats_log": analyze_nats_log(nats.log_path if nats else None),
        "per_relay": per_relay,
    }


def relay_statistics_delta(at_go: JSON | None, at_end: JSON | None) -> JSON | None:
    """The relay's own counters over the measurement (``Viewer.statistics()``)."""
    if not at_go or not at_end:
        return None
    delta: JSON = {k: at_end[k] - at_go[k] for k in RELAY_COUNTERS if k in at_go and k in at_end}
    for key in ("gaps_by_reason", "rejected"):
        before, after = at_go.get(key) or {}, at_end.get(key) or {}
        delta[key] = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    return {
        "delta": delta,
        "at_end": {k: at_end.get(k) for k in RELAY_GAUGES},
        "rss_mb_at_end": at_end["rss_bytes"] / 2**20 if at_end.get("rss_bytes") else None,
    }


def _segments_estimate(rate: float | None, coord: Coordinator) -> JSON | None:
    """Idle bytes with TCP/IP headers: each heartbeat is a segment and is ACKed."""
    if rate is None:
        return None
    # Every idle frame is a heartbeat: one segment each way, plus its ACK.
    heartbeat = len(encode_message(Heartbeat(time=time.time())))
    segments_per_s = rate / heartbeat
    return {
        "heartbeat_frame_bytes_estimate": heartbeat,
        "segments_per_s_per_session": segments_per_s,
        "bytes_per_s_per_session_with_tcp_ip": rate + segments_per_s * 2 * SEGMENT_OVERHEAD,
    }


def num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def print_summary(results: JSON, plan: Plan, title: str = "") -> None:
    r = results
    lines = [
        "",
        f"loupelive load test{' — ' + title if title else ''} — mode {r['mode']}, "
        f"{r['agents']:,} agents, {r['watched']:,} watched × "
        f"{plan.viewers_per_session} viewers ({r['stalled_viewers']} stalled), {r['seconds']:g} s"
        + (f" at {r['rate']:g} records/s per session" if r["rate"] else ""),
        f"  corpus: {r['corpus'] or 'n/a'}",
    ]
    if r["mode"] != "idle":
        per_viewer = r["delivered_records_per_s_per_viewer"]
        gaps = ", ".join(
            f"{k} {v} ({r['gap_seqs_by_reason'].get(k, 0):,} seqs)" for k, v in r["gaps_by_reason"].items()
        )
        lines += [
            f"  records: sent {r['records_sent']:,}; delivered {r['records_delivered']:,} to "
            f"{r['active_viewers']} active viewers; lost {r['records_lost']:,}; duplicated {r['records_duplicated']}",
            f"  gaps: {r['gaps']} ({gaps or 'none'})",
            f"  throughput: {num(r['delivered_records_per_s'])} records/s delivered "
            f"({num(per_viewer)} per viewer) over {r['elapsed_s']:.2f} s",
            f"  latency log() → viewer: p50 {num(r['latency_ms']['p50'], '.2f')} ms, "
            f"p99 {num(r['latency_ms']['p99'], '.2f')} ms, max {num(r['latency_ms']['max'], '.2f')} ms",
            f"  size: {num(r['wire_bytes_per_record'], '.1f')} B/record on the agents' data connections "
            f"({num(r['agents_detail']['records_per_batch'], '.0f')} records/batch) vs "
            f"{num(r['json_bytes_per_record'], '.1f')} B/record as JSON lines",
        ]
        if r["stalled_viewers"]:
            s = r["stalled"]
            lines.append(
                f"  stalled viewers: {s['viewers']}, got {s['records_delivered']:,} records afterwards, "
                f"gaps {s['gaps_by_reason'] or 'none'}, slow_consumer closes seen {s['slow_consumer_disconnects']} "
                f"(relay logged {num(s['slow_consumer_disconnects_relay_log'])}), "
                f"reached the last seq: {s['reached_last_seq']}"
            )
        plain = r["plain"]
        if plain:
            lines.append(
                f"  relay vs plain TCP fan-out: {num(r['relay_vs_plain'], '.4f')} "
                f"(relay {r['relay']['bytes_in_per_s'] / 1e6:.3f} MB/s in, plain {plain['bytes_per_s'] / 1e6:.1f} MB/s "
                f"for {plain['bytes_per_round'] / 1e6:.2f} MB in {plain['seconds'] * 1000:.0f} ms)"
            )
    else:
        seg = r["idle_segments_estimate"] or {}
        lines.append(
            f"  idle traffic: {num(r['idle_bytes_per_s_per_session'], '.2f')} B/s per session (frames, both "
            f"directions; ~{num(seg.get('bytes_per_s_per_session_with_tcp_ip'), '.1f')} B/s with TCP/IP headers)"
        )
    relay = r["relay"]
    lines.append(
        f"  relay: RSS peak {num(r['relay_rss_mb'], '.1f')} MiB ({num(r['relay_rss_kb_per_session'], '.1f')} KiB "
        f"per session over baseline), CPU {num(r['relay_cpu_s'], '.2f')} s in {r['elapsed_s']:.1f} s "
        f"({num(relay['cpu_share'] * 100 if relay['cpu_share'] is not None else None, '.0f')} % of a core)"
    )
    cpu = r["workers"]["cpu_s"]
    lines.append(
        f"  workers: agents {num(cpu['agents'], '.1f')} CPU s in {r['workers']['agent_procs']} procs, "
        f"viewers {num(cpu['viewers'], '.1f')} CPU s in {r['workers']['viewer_procs']} procs"
    )
    stats = relay.get("statistics")
    if stats:
        d = stats["delta"]
        lines.append(
            f"  relay counted: {d.get('bytes_in', 0) / 1e6:.2f} MB in, {d.get('bytes_out', 0) / 1e6:.2f} MB out, "
            f"{d.get('records_dropped', 0):,} records dropped for slow viewers, gaps {d.get('gaps_by_reason') or 'none'}, "
            f"{d.get('slow_consumer_disconnects', 0)} slow-consumer disconnects, rejected {d.get('rejected') or 'none'}"
        )
    log = relay.get("log") or {}
    if log:
        lines.append(
            f"  relay log: {log['skips']} skips, {log['catch_ups']} catch-ups, "
            f"{log['slow_consumer_disconnects']} slow-consumer disconnects, {log['warnings']} warnings, "
            f"{log['errors']} errors"
            + (
                f", {log['feed_skips']} feed skips, {log['feed_holes']} feed holes"
                if r.get("cluster")
                else ""
            )
        )
    if r.get("cluster"):
        lines += cluster_summary(r)
    lines.append(
        "  result: OK" if r["ok"] else "  result: FAILED\n" + "\n".join(f"    - {f}" for f in r["failures"])
    )
    print("\n".join(lines))


def cluster_summary(r: JSON) -> list[str]:
    c = r["cluster"]
    st, nats, setup = c["statistics"], c["nats_server"], c["setup"] or {}
    varz = nats["varz_delta"] or {}
    lines = [
        f"  cluster: {c['relays']} relays ({', '.join(c['names'])}) on nats-server {nats['version']}; peers heard "
        f"after {num(setup.get('peers_s'), '.2f')} s, every list complete {num(setup.get('directory_s'), '.2f')} s "
        "after the last registration",
        f"  across NATS: feeds {st.get('feed_bytes_out', 0) / 1e6:.2f} MB = "
        f"{num(c['feed_bytes_out_per_delivered_record'], '.1f')} B per delivered record "
        f"({num(c['feed_bytes_out_per_s'], ',.0f')} B/s); nats-server in {varz.get('in_bytes', 0) / 1e6:.2f} MB / "
        f"out {varz.get('out_bytes', 0) / 1e6:.2f} MB, not feeds (alive, directory, ctl) "
        f"{num(nats['other_in_bytes_per_s'], ',.0f')} B/s in",
    ]
    directory = c["directory"]
    if directory:
        kinds = ", ".join(f"{k} {v:,.0f}" for k, v in directory["bytes_per_s"].items())
        lines.append(
            f"  not feeds, as published (B/s): {kinds or 'none'}; {num(directory['bytes_per_counts_entry'], '.0f')} B "
            f"per counts entry, {num(directory['bytes_per_alive'], '.0f')} B per alive"
        )
    lines += [
        f"  cluster counters: overflow gaps {st.get('cluster_overflow_gaps', 0)}, feed holes {st.get('feed_holes', 0)}, "
        f"NATS inbox drops {st.get('nats_inbox_drops', 0)}, reconnects {st.get('nats_reconnects', 0)}, NATS slow "
        f"consumers {varz.get('slow_consumers', 0)}; nats-server CPU {num(nats['cpu_s'], '.2f')} s, peak RSS "
        f"{num(nats['peak_rss_mb'], '.1f')} MiB",
    ]
    for one in c["per_relay"]:
        lines.append(
            f"    relay {one['name']}: {one['agents']:,} agents, {one['viewers']:,} viewers, CPU "
            f"{num(one['cpu_s'], '.2f')} s, RSS {num(one['rss_mb_baseline'], '.1f')} MiB → "
            f"{num(one['rss_mb_registered'], '.1f')} registered → {num(one['rss_mb_peak'], '.1f')} peak, feeds out "
            f"{one['cluster_delta'].get('feed_bytes_out', 0) / 1e6:.2f} MB, in "
            f"{one['cluster_delta'].get('feed_bytes_in', 0) / 1e6:.2f} MB"
        )
    return lines


def print_comparison(comparison: JSON) -> None:
    rows = [
        (name, v) for name, v in comparison.items() if v["single"] is not None or v["cluster"] is not None
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        "",
        f"  {'single relay vs cluster':<{width}}  {'single':>14}  {'cluster':>14}  {'cluster/single':>14}",
    ]
    for name, v in rows:
        lines.append(
            f"  {name:<{width}}  {num(v['single'], ',.2f'):>14}  {num(v['cluster'], ',.2f'):>14}  "
            f"{num(v['cluster_over_single'], '.3f'):>14}"
        )
    print("\n".join(lines))


# -- command line ---------------------------------------------------------------------------


def parse_relay(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise argparse.ArgumentTypeError(
            f"{host} is not a loopback address: this load test stays on 127.0.0.1"
        )
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="See the module docstring (scripts/loadtest.py) for what each figure means.",
    )
    parser.add_argument("--agents", type=int, metavar="N", help="sessions (simulated agents)")
    parser.add_argument(
        "--watched", type=int, metavar="K", help="sessions with viewers (default: all; idle: 0)"
    )
    parser.add_argument(
        "--viewers-per-session", type=int, default=1, metavar="M", help="viewers per watched session"
    )
    parser.add_argument(
        "--stalled-viewers", type=int, default=0, metavar="X", help="of the M, viewers that never read"
    )
    parser.add_argument("--mode", choices=MODES, default="bulk")
    parser.add_argument(
        "--rate", type=float, default=10.0, metavar="R", help="trickle: records/s per session"
    )
    parser.add_argument(
        "--unwatched-rate",
        type=float,
        default=0.0,
        metavar="U",
        help="trickle: the sessions nobody watches log U records/s too (default 0: they only heartbeat)",
    )
    parser.add_argument(
        "--pause-lists",
        action="store_true",
        help="each viewer pauses its session list once its stream is open (no list updates)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, metavar="S", help="length of the measurement")
    parser.add_argument(
        "--corpus", metavar="DIR", help="*_structured.csv directory (default: the shared loghub)"
    )
    parser.add_argument(
        "--relay",
        type=parse_relay,
        metavar="HOST:PORT",
        help="load this relay (agent port) instead of starting one",
    )
    parser.add_argument(
        "--viewer-port", type=int, metavar="PORT", help="with --relay: its viewer port (default PORT+1)"
    )
    parser.add_argument(
        "--relays",
        type=int,
        default=1,
        metavar="R",
        help="with --cluster: relays over one nats-server (agent i on relay i mod R, its viewers on i+1 mod R)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run the workload on R relays joined over NATS (after the same on one relay: see --no-single)",
    )
    parser.add_argument(
        "--no-single", action="store_true", help="with --cluster: skip the single-relay run for comparison"
    )
    parser.add_argument(
        "--nats-server", metavar="PATH", help="with --cluster: the nats-server binary (default: from PATH)"
    )
    parser.add_argument("--tls", action="store_true", help="TLS on every connection")
    parser.add_argument(
        "--ca", metavar="FILE", help="with --relay --tls: CA file to trust (default: system store)"
    )
    parser.add_argument("--agent-procs", type=int, default=1, metavar="P", help="agent worker processes")
    parser.add_argument("--viewer-procs", type=int, default=1, metavar="V", help="viewer worker processes")
    parser.add_argument("--json", metavar="PATH", help="write the results here as one JSON object")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, metavar="S", help="bound on delivery after logging"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="S",
        help="wait S seconds after setup before the measurement (keeps the relay's first clock probes out)",
    )
    parser.add_argument("--plain-rounds", type=int, default=3, help="plain fan-out transfers (median)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain fan-out baseline")
    parser.add_argument("--keep-logs", action="store_true", help="keep the relay and worker logs")
    parser.add_argument("--seed", type=int, help="random seed (trickle phases)")
    parser.add_argument(
        "--per-source",
        type=int,
        default=PER_SOURCE,
        metavar="N",
        help=f"clients per loopback source address (default {PER_SOURCE}; 0: all from 127.0.0.1)",
    )
    parser.add_argument("--consumer-yield", type=int, default=CONSUMER_YIELD, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    return parser


def make_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    def fail(message: str) -> NoReturn:
        parser.error(message)

    if args.agents is None:
        fail("--agents is required")
    n = args.agents
    if not 1 <= n <= 100_000:
        fail("--agents must be 1..100000")
    if args.mode == "idle":
        if args.watched:
            fail("--mode idle: nobody watches (leave out --watched)")
        k = 0
    else:
        k = n if args.watched is None else args.watched
        if not 1 <= k <= n:
            fail("--watched must be 1..N (bulk and trickle need viewers)")
    m, x = args.viewers_per_session, args.stalled_viewers
    if not 1 <= m <= 1000:
        fail("--viewers-per-session must be 1..1000")
    if not 0 <= x < m:
        fail("--stalled-viewers must be 0..M-1 (at least one viewer per session reads)")
    if k * m > RELAY_MAX_VIEWER_CONNECTIONS:
        fail(f"K × M = {k * m} viewers exceeds the relay's {RELAY_MAX_VIEWER_CONNECTIONS} viewer connections")
    if not 0 < args.seconds <= 3600:
        fail("--seconds must be in (0, 3600]")
    if not 0 < args.rate <= 100_000:
        fail("--rate must be in (0, 100000]")
    if args.unwatched_rate:
        if args.mode != "trickle" or not 0 < args.unwatched_rate <= 1000:
            fail("--unwatched-rate goes with --mode trickle and must be in (0, 1000]")
        if k == n:
            fail("--unwatched-rate needs sessions nobody watches (--watched K < N)")
    if not 1 <= args.agent_procs <= max(1, n):
        fail("--agent-procs must be 1..N")
    if not 1 <= args.viewer_procs <= 64:
        fail("--viewer-procs must be 1..64")
    if not 0 < args.drain_timeout <= 600:
        fail("--drain-timeout must be in (0, 600]")
    if not 0 <= args.settle <= 600:
        fail("--settle must be in [0, 600]")
    if args.per_source:
        agent_sources = math.ceil(n / args.per_source)
        viewer_sources = math.ceil(k * m / max(1, args.per_source // 2))
        if args.per_source < 0 or max(agent_sources, viewer_sources) > 240:
            fail("--per-source must be 0 (off) or large enough for at most 240 source addresses")
    if not 1 <= args.plain_rounds <= 20:
        fail("--plain-rounds must be 1..20")
    if args.viewer_port is not None and args.relay is None:
        fail("--viewer-port goes with --relay")
    if args.ca and not (args.tls and args.relay):
        fail("--ca goes with --relay --tls")
    if args.corpus is not None and not Path(args.corpus).is_dir():
        fail(f"--corpus {args.corpus}: not a directory")
    relays = args.relays
    if args.cluster:
        if not 2 <= relays <= 32:
            fail(
                "--cluster needs --relays 2..32 (each session's viewers are on another relay than its agent)"
            )
        if args.relay is not None:
            fail("--cluster starts its own relays and nats-server: leave out --relay")
        if find_nats_server(args.nats_server) is None:
            fail(
                f"--cluster needs nats-server: {args.nats_server or 'not on PATH nor in ' + ', '.join(NATS_SERVER_FALLBACKS)}"
                " (--nats-server PATH)"
            )
        missing = [m for m in ("nats", "trio_asyncio") if importlib.util.find_spec(m) is None]
        if missing:
            fail(f"--cluster needs {' and '.join(missing)}: pip install 'loupelive[cluster]'")
    else:
        if relays != 1:
            fail("--relays R > 1 goes with --cluster")
        if args.no_single:
            fail("--no-single goes with --cluster")
        if args.nats_server:
            fail("--nats-server goes with --cluster")
    limit = _procs.raise_nofile_limit()
    p = args.agent_procs
    per_agent_proc = math.ceil(n / p) + math.ceil(k / p) + FD_SLACK
    if per_agent_proc > limit:
        need = math.ceil((n + k) / (limit - FD_SLACK))
        fail(
            f"{per_agent_proc} descriptors per agent process exceed the limit {limit}: use --agent-procs {need}"
        )
    viewers_per_proc = math.ceil(k * m / args.viewer_procs) * 2 + FD_SLACK
    if viewers_per_proc > limit:
        fail(
            f"{viewers_per_proc} descriptors per viewer process exceed the limit {limit}: raise --viewer-procs"
        )
    # One relay takes every connection; in a cluster each takes its share (and none
    # when --no-single leaves out the single-relay run).
    per_relay = 1 if not args.cluster or not args.no_single else relays
    relay_fds = math.ceil((n + k + 2 * k * m) / per_relay) + FD_SLACK
    if args.relay is None and relay_fds > limit:
        fail(f"the relay would need {relay_fds} descriptors; the limit is {limit}")
    run_id = uuid.uuid4().hex[:8]
    return Plan(
        run_id=run_id,
        mode=args.mode,
        agents=n,
        watched=k,
        viewers_per_session=m if k else 0,
        stalled_per_session=x if k else 0,
        agent_procs=p,
        viewer_procs=args.viewer_procs,
        session_ids=[f"{APP}-{run_id}-{i:05d}" for i in range(n)],
    )


async def _main_async(args: argparse.Namespace, plan: Plan, run_dir: Path) -> JSON:
    """One run, or with ``--cluster`` a single-relay run and then the cluster run."""
    phases: list[tuple[str, Plan, bool]] = []
    if args.cluster:
        if not args.no_single:
            phases.append(("single", plan.for_relays(1, "s"), False))
        phases.append(("cluster", plan.for_relays(args.relays, "c"), True))
    else:
        phases.append(("", plan, False))
    tls_files = make_tls_files(run_dir) if args.tls and args.relay is None else None
    results: dict[str, JSON] = {}
    interrupted = False
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        for label, phase_plan, cluster in phases:
            coord = Coordinator(
                args, phase_plan, run_dir / label if label else run_dir, cluster=cluster, tls_files=tls_files
            )
            if label:
                coord.out.note(
                    f"== {label} run: "
                    + (f"{phase_plan.relays} relays over NATS" if cluster else "one relay, no cluster")
                )
            try:
                raw = await coord.run()
            finally:
                coord.out.end()
            results[label] = build_results(args, phase_plan, coord, raw)
        nursery.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt
    if not args.cluster:
        return results[""]
    return combine_results(results.get("single"), results["cluster"])


#: Figures set side by side for ``--cluster`` (name → how to read it from one run's results).
COMPARED: Final[dict[str, Callable[[JSON], float | None]]] = {
    "delivered_records_per_s": lambda r: r["delivered_records_per_s"],
    "elapsed_s": lambda r: r["elapsed_s"],
    "records_sent": lambda r: r["records_sent"],
    "records_delivered": lambda r: r["records_delivered"],
    "records_lost": lambda r: r["records_lost"],
    "gaps": lambda r: r["gaps"],
    "cluster_overflow_gaps": lambda r: r["cluster_overflow_gaps"],
    "latency_p50_ms": lambda r: r["latency_ms"]["p50"],
    "latency_p99_ms": lambda r: r["latency_ms"]["p99"],
    "latency_max_ms": lambda r: r["latency_ms"]["max"],
    "relay_cpu_s": lambda r: r["relay_cpu_s"],
    "relay_cpu_us_per_delivered_record": lambda r: _ratio(
        r["relay_cpu_s"] * 1e6 if r["relay_cpu_s"] is not None else None, r["records_delivered"]
    ),
    "nats_cpu_s": lambda r: r["cluster"]["nats_server"]["cpu_s"] if r["cluster"] else None,
    "server_cpu_s": lambda r: (
        (r["relay_cpu_s"] or 0.0) + ((r["cluster"]["nats_server"]["cpu_s"] or 0.0) if r["cluster"] else 0.0)
        if r["relay_cpu_s"] is not None
        else None
    ),
    "relay_rss_mb_peak": lambda r: r["relay_rss_mb"],
    "relay_rss_kb_per_session": lambda r: r["relay_rss_kb_per_session"],
    "agents_cpu_s": lambda r: r["workers"]["cpu_s"]["agents"],
    "viewers_cpu_s": lambda r: r["workers"]["cpu_s"]["viewers"],
    "wire_bytes_per_record": lambda r: r["wire_bytes_per_record"],
    "feed_bytes_out_per_delivered_record": lambda r: (
        r["cluster"]["feed_bytes_out_per_delivered_record"] if r["cluster"] else None
    ),
    "nats_in_bytes_per_s": lambda r: r["cluster"]["nats_server"]["in_bytes_per_s"] if r["cluster"] else None,
    "nats_other_in_bytes_per_s": lambda r: (
        r["cluster"]["nats_server"]["other_in_bytes_per_s"] if r["cluster"] else None
    ),
    "idle_bytes_per_s_per_session": lambda r: r["idle_bytes_per_s_per_session"],
}


def combine_results(single: JSON | None, cluster: JSON) -> JSON:
    """The cluster run's results, with the single-relay run's under ``single`` and a comparison."""
    comparison: JSON = {}
    for name, get in COMPARED.items():
        c = get(cluster)
        s = get(single) if single is not None else None
        comparison[name] = {"single": s, "cluster": c, "cluster_over_single": _ratio(c, s)}
    results = {**cluster, "single": single, "comparison": comparison}
    if single is not None and not single["ok"]:
        results["ok"] = False
        results["failures"] = cluster["failures"] + [f"single relay: {f}" for f in single["failures"]]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if not args.worker_config:
            parser.error("--worker needs --worker-config")
        return worker_main(args.worker, args.worker_config)
    plan = make_plan(parser, args)
    if args.seed is not None:
        random.seed(args.seed)
    if args.corpus is None and default_corpus_dir() is None:
        print("loadtest: no corpus found; replaying synthetic demo records", file=sys.stderr)
    run_dir = Path(tempfile.mkdtemp(prefix="loupelive-loadtest-"))
    load_before = list(os.getloadavg())
    status = 1
    try:
        try:
            results = trio.run(_main_async, args, plan, run_dir)
        except BaseException as exc:
            inner = leaf(exc)
            if isinstance(inner, KeyboardInterrupt):
                print("\nloadtest: interrupted; stopping every process", file=sys.stderr)
                status = 130
                return status
            if isinstance(inner, RunFailed | LoupeError | OSError):
                print(f"\nloadtest: run failed: {inner}", file=sys.stderr)
                return status
            raise
        results["machine"] = _machine_info()
        results["machine"]["load_average_before"] = load_before
        results["logs"] = str(run_dir) if (args.keep_logs or not results["ok"]) else None
        if args.cluster:
            if results["single"] is not None:
                print_summary(results["single"], plan, "single relay")
            print_summary(results, plan, f"cluster of {args.relays} relays")
            print_comparison(results["comparison"])
        else:
            print_summary(results, plan)
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"  results written to {path}")
        status = 0 if results["ok"] else 1
        return status
    finally:
        stopped = _procs.terminate_all(grace=5.0)
        if stopped:
            print(f"loadtest: stopped {len(stopped)} leftover processes", file=sys.stderr)
        if status == 0 and not args.keep_logs:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif run_dir.exists():
            print(f"loadtest: logs kept in {run_dir}", file=sys.stderr)


def _machine_info() -> JSON:
    try:
        from bench_compression import machine_info

        info: JSON = machine_info()
        return info
    except Exception as exc:  # the figures matter more than their label
        return {"error": describe(exc)}


if __name__ == "__main__":
    sys.exit(main())

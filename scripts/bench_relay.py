#!/usr/bin/env python3
"""End-to-end throughput of a real relay on loopback, against a plain Trio byte pipe.

One process, one Trio loop, real TCP on 127.0.0.1:

* a relay (``loupelive.serve_relay`` on ephemeral ports, default configuration);
* one agent (``open_agent``) that logs ``--records`` corpus records as fast as it
  can (``agent.log`` in a loop, ``await trio.lowlevel.checkpoint()`` every 500
  records; the corpus is replayed in file order, repeated if it is shorter);
* ``--viewers`` viewers, each its own ``open_viewer`` + ``open_stream``, that
  consume every item and check continuity on the fly: every seq of the run
  exactly once and in order, either as a record or inside a gap.  Gaps are
  counted by reason, never hidden: ``agent_overflow`` means the agent's ring
  buffer dropped records faster logging than the link carried; ``viewer_slow``
  means the relay skipped a viewer.

Before the clock starts the agent logs probe records until every viewer has
received one, so every viewer is live.  The clock stops when every viewer has
covered the last seq.

Two agent configurations are measured (``--agent-buffer`` picks one):

``default``
    loupelive's default ring buffer (10,000 records): logging this fast
    overflows it, and the report says how many records were lost to
    ``agent_overflow`` gaps;
``holds-all``
    a ring buffer that holds the whole run, so nothing is dropped and the
    figure is the pipeline's throughput.

Measured per run: records/s delivered (per viewer, and summed over viewers), the
rate the application logged at, bytes on the wire per record (agent → relay, and
relay → viewer per record delivered), process RSS (baseline and peak: one process
holds relay, agent and viewers, so this is all three) and the relay's peak
queued bytes.

Baseline, in the same process right after each relay run: a plain Trio byte
pipe on loopback TCP.  One sender writes the bytes the agent sent in that run,
in as many writes as it sent batches (each of their mean size), to a trivial
forwarder task that ``receive_some``-s each chunk and ``send_all``-s it to
``--viewers`` receivers in turn, which count bytes.  No framing, compression
or decoding.  Its time is the median of 5 transfers.  The report gives the
relay's records/s as a ratio of the pipe's (records/s had the pipe carried the
same records), per run and as a median.

Writes JSON to ``--out``; a default run takes 10–30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio
import trio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compression import machine_info
from corpus import corpus_or_synthetic

import loupelive
from loupelive import Gap, Level, Record, RelayConfig
from loupelive.records import BatchDecoder, BatchEncoder

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
CHECKPOINT_EVERY: Final = 500
#: The pipe's reads are as large as the relay's (loupelive.connection.RECEIVE_SIZE).
PIPE_RECEIVE_SIZE: Final = 256 * 1024
PIPE_TRANSFERS: Final = 5
SAMPLE_INTERVAL: Final = 0.02
#: A run that has not delivered everything after this long is reported as stuck.
RUN_TIMEOUT: Final = 120.0
#: Records used to time log/encode/decode alone after each run.
CODEC_SAMPLE: Final = 20_000
#: Byte bound of a "holds-all" ring buffer: large enough never to bind.
UNBOUNDED_BYTES: Final = 1 << 40


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@attrs.define
class Checker:
    """One viewer's consumer: counts what arrives and checks continuity."""

    first_seq: int = 0  # 0 until the timed part starts: records before are probes
    last_seq: int = 0
    covered: int = 0  # the last seq covered by a record or a gap
    records: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    holes: int = 0  # seqs skipped with no gap saying so
    gaps: Counter[str] = attrs.Factory(Counter)
    gap_seqs: Counter[str] = attrs.Factory(Counter)
    live: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)
    done_at: float = 0.0
    error: str | None = None

    def start(self, first_seq: int, last_seq: int) -> None:
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.covered = first_seq - 1

    def _advance(self, first: int, last: int) -> None:
        if first <= self.covered:
            if last <= self.covered:
                self.duplicates += last - first + 1
            else:
                self.out_of_order += 1
        elif first > self.covered + 1:
            self.holes += first - self.covered - 1
        self.covered = max(self.covered, last)
        if self.covered >= self.last_seq and not self.done.is_set():
            self.done_at = time.perf_counter()
            self.done.set()

    async def consume(self, stream: loupelive.Stream) -> None:
        try:
            await self._consume(stream)
        except loupelive.ConnectionClosed as exc:  # e.g. slow_consumer: report it, end the run
            self.error = f"{exc.code.value}: {exc}"
        finally:
            if not self.done.is_set():
                self.done_at = time.perf_counter()
                self.done.set()

    async def _consume(self, stream: loupelive.Stream) -> None:
        async for item in stream:
            if isinstance(item, Record):
                if not self.first_seq or item.seq < self.first_seq:
                    self.live.set()  # a probe
                    continue
                self.records += 1
                self._advance(item.seq, item.seq)
            elif isinstance(item, Gap) and self.first_seq and item.last_seq >= self.first_seq:
                first = max(item.first_seq, self.first_seq)
                self.gaps[item.reason] += 1
                self.gap_seqs[item.reason] += item.last_seq - first + 1
                self._advance(first, item.last_seq)

    @property
    def errors(self) -> int:
        incomplete = self.covered < self.last_seq or self.error is not None
        return self.duplicates + self.out_of_order + self.holes + int(incomplete)

    def report(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "gaps": dict(self.gaps),
            "gap_seqs": dict(self.gap_seqs),
            "seqs_expected": self.last_seq - self.first_seq + 1,
            "seqs_accounted": self.records + sum(self.gap_seqs.values()),
            "complete": self.covered >= self.last_seq,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "unexplained_holes": self.holes,
            "error": self.error,
        }


@attrs.define
class Peaks:
    rss: int = 0
    relay_queued: int = 0
    agent_buffered_bytes: int = 0
    agent_buffered_records: int = 0

    async def sample(self, relay: loupelive.Relay, agent: loupelive.Agent) -> None:
        while True:
            self.rss = max(self.rss, rss_bytes())
            self.relay_queued = max(self.relay_queued, relay.statistics().queued_bytes)
            stats = agent.statistics()
            self.agent_buffered_bytes = max(self.agent_buffered_bytes, stats.buffered_bytes)
            self.agent_buffered_records = max(self.agent_buffered_records, stats.records_buffered)
            await trio.sleep(SAMPLE_INTERVAL)


async def _wait_live(agent: loupelive.Agent, checkers: Sequence[Checker]) -> None:
    """Log probes until every viewer has received one."""
    with trio.fail_after(30):
        while not all(c.live.is_set() for c in checkers):
            agent.log(Level.INFO, "probe", logger="bench")
            with trio.move_on_after(0.05):
                for checker in checkers:
                    await checker.live.wait()
    await trio.sleep(0.1)  # let the probes' tail drain


async def _log_all(agent: loupelive.Agent, records: Sequence[Record], n: int) -> None:
    log = agent.log
    for i, r in enumerate(itertools.islice(itertools.cycle(records), n), 1):
        log(r.level, r.message, logger=r.logger, thread=r.thread, fields=r.fields, timestamp=r.timestamp)
        if i % CHECKPOINT_EVERY == 0:
            await trio.lowlevel.checkpoint()


async def run_relay(
    records: Sequence[Record], n: int, viewers: int, buffer_records: int | None
) -> dict[str, Any]:
    """One timed run through a fresh relay, agent and viewers."""
    config = RelayConfig(host="127.0.0.1", agent_port=0, viewer_port=0)
    options: dict[str, Any] = {"close_timeout": 10.0}
    if buffer_records is not None:
        options.update(buffer_records=buffer_records, buffer_bytes=UNBOUNDED_BYTES)
    checkers = [Checker() for _ in range(viewers)]
    peaks = Peaks()
    gc.collect()
    async with trio.open_nursery() as root:
        relay: loupelive.Relay = await root.start(loupelive.serve_relay, config)
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="bench-relay", **options) as agent,
            contextlib.AsyncExitStack() as stack,
        ):
            streams = []
            for _ in checkers:
                viewer = await stack.enter_async_context(
                    loupelive.open_viewer("127.0.0.1", relay.viewer_port)
                )
                streams.append(await stack.enter_async_context(viewer.open_stream(agent.session_id)))
            async with trio.open_nursery() as tasks:
                for checker, stream in zip(checkers, streams, strict=True):
                    tasks.start_soon(checker.consume, stream)
                await _wait_live(agent, checkers)
                first_seq = agent.statistics().records_logged + 1
                for checker in checkers:
                    checker.start(first_seq, first_seq + n - 1)
                relay_before, agent_before = relay.statistics(), agent.statistics()
                rss_before = peaks.rss = rss_bytes()
                tasks.start_soon(peaks.sample, relay, agent)
                start = time.perf_counter()
                await _log_all(agent, records, n)
                logged_at = time.perf_counter()
                sent_while_logging = agent.statistics().records_sent - agent_before.records_sent
                end = float("nan")
                with trio.move_on_after(RUN_TIMEOUT):
                    for checker in checkers:
                        await checker.done.wait()
                    end = max(c.done_at for c in checkers)
                relay_after, agent_after = relay.statistics(), agent.statistics()
                tasks.cancel_scope.cancel()
        root.cancel_scope.cancel()

    elapsed = end - start
    delivered = sum(c.records for c in checkers)
    batches_in = relay_after.batches_in - relay_before.batches_in
    bytes_in = relay_after.bytes_in - relay_before.bytes_in
    records_in = relay_after.records_in - relay_before.records_in
    bytes_out = relay_after.bytes_out - relay_before.bytes_out
    return {
        "records_logged": n,
        "viewers": viewers,
        "agent_buffer_records": buffer_records,
        "completed": elapsed == elapsed,  # not NaN
        "seconds": elapsed,
        "log_seconds": logged_at - start,
        "log_rate": n / (logged_at - start),
        "records_per_s_per_viewer": delivered / viewers / elapsed,
        "records_per_s_all_viewers": delivered / elapsed,
        "delivered_fraction": delivered / viewers / n,
        "agent": {
            "records_sent": agent_after.records_sent - agent_before.records_sent,
            "records_sent_while_logging": sent_while_logging,
            "batches_sent": agent_after.batches_sent - agent_before.batches_sent,
            "bytes_sent": agent_after.bytes_sent - agent_before.bytes_sent,
            "records_dropped": agent_after.records_dropped - agent_before.records_dropped,
            "peak_buffered_records": peaks.agent_buffered_records,
            "peak_buffered_bytes": peaks.agent_buffered_bytes,
        },
        "relay": {
            "batches_in": batches_in,
            "records_in": records_in,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "batches_dropped": relay_after.batches_dropped - relay_before.batches_dropped,
            "gaps_sent": relay_after.gaps_sent - relay_before.gaps_sent,
            "peak_queued_bytes": peaks.relay_queued,
        },
        "wire_bytes_per_record_in": bytes_in / records_in if records_in else 0.0,
        "wire_bytes_per_record_out": bytes_out / delivered if delivered else 0.0,
        "mean_batch_bytes": bytes_in / batches_in if batches_in else 0.0,
        "mean_batch_records": records_in / batches_in if batches_in else 0.0,
        "rss_before": rss_before,
        "rss_peak": peaks.rss,
        "per_viewer": [c.report() for c in checkers],
        "continuity_errors": sum(c.errors for c in checkers),
    }


async def _pipe_transfer(chunk: int, writes: int, receivers: int) -> float:
    """Seconds to push ``writes`` × ``chunk`` bytes through a forwarder to every receiver."""
    payload = memoryview(bytes(chunk))
    total = chunk * writes
    done_at = [0.0] * receivers
    all_done = trio.Event()

    async def receive(index: int, stream: trio.SocketStream) -> None:
        got = 0
        while got < total:
            data = await stream.receive_some(PIPE_RECEIVE_SIZE)
            if not data:
                break
            got += len(data)
        done_at[index] = time.perf_counter()
        if all(done_at):
            all_done.set()

    async with trio.open_nursery() as nursery:
        [in_listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        [out_listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        sender = await trio.open_tcp_stream("127.0.0.1", in_listener.socket.getsockname()[1])
        source = await in_listener.accept()
        sinks, clients = [], []
        for index in range(receivers):
            clients.append(await trio.open_tcp_stream("127.0.0.1", out_listener.socket.getsockname()[1]))
            sinks.append(await out_listener.accept())
            nursery.start_soon(receive, index, clients[-1])

        async def forward() -> None:
            while data := await source.receive_some(PIPE_RECEIVE_SIZE):
                for sink in sinks:
                    await sink.send_all(data)

        nursery.start_soon(forward)
        gc.collect()
        start = time.perf_counter()
        for _ in range(writes):
            await sender.send_all(payload)
        await all_done.wait()
        elapsed = max(done_at) - start
        nursery.cancel_scope.cancel()
    for resource_ in (sender, source, *clients, *sinks, in_listener, out_listener):
        await resource_.aclose()
    return elapsed


async def run_pipe(total_bytes: int, writes: int, receivers: int, records: int) -> dict[str, Any]:
    writes = max(writes, 1)
    chunk = max(total_bytes // writes, 1)
    times = [await _pipe_transfer(chunk, writes, receivers) for _ in range(PIPE_TRANSFERS)]
    seconds = statistics.median(times)
    return {
        "bytes": chunk * writes,
        "writes": writes,
        "write_bytes": chunk,
        "seconds": seconds,
        "seconds_all": times,
        "records_per_s_per_viewer": records / seconds,
        "megabytes_per_s_per_receiver": chunk * writes / seconds / 1e6,
    }


async def measure_codec(records: Sequence[Record], sample: int, batch_records: float) -> dict[str, float]:
    """Seconds per record of the work every run must do anyway, each part alone, in this process.

    ``log``: ``agent.log`` into an agent nobody watches (just the ring buffer);
    ``encode``: ``BatchEncoder`` at the run's mean batch size; ``decode``:
    ``BatchDecoder`` on those batches (each viewer does this once per record).
    """
    chosen = list(itertools.islice(itertools.cycle(records), sample))
    config = RelayConfig(host="127.0.0.1", agent_port=0, viewer_port=0)
    async with trio.open_nursery() as root:
        relay: loupelive.Relay = await root.start(loupelive.serve_relay, config)
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="bench-codec") as agent:
            gc.collect()
            start = time.perf_counter()
            log = agent.log
            for r in chosen:
                log(
                    r.level,
                    r.message,
                    logger=r.logger,
                    thread=r.thread,
                    fields=r.fields,
                    timestamp=r.timestamp,
                )
            log_seconds = time.perf_counter() - start
        root.cancel_scope.cancel()
    numbered = [attrs.evolve(r, seq=i) for i, r in enumerate(chosen, 1)]
    size = max(1, round(batch_records))
    encoder = BatchEncoder()
    gc.collect()
    start = time.perf_counter()
    payloads = [
        encoder.encode(numbered[i : i + size], first_seq=i + 1, last_seq=min(i + size, sample), sync=i == 0)
        for i in range(0, sample, size)
    ]
    encode_seconds = time.perf_counter() - start
    decoder = BatchDecoder()
    gc.collect()
    start = time.perf_counter()
    for payload in payloads:
        decoder.decode(payload)
    decode_seconds = time.perf_counter() - start
    return {
        "sample": sample,
        "batch_records": size,
        "log": log_seconds / sample,
        "encode": encode_seconds / sample,
        "decode": decode_seconds / sample,
    }


def codec_share(run: dict[str, Any], codec: dict[str, float]) -> float:
    """Fraction of the run's wall time that its log + encode + decode work takes alone."""
    work = (
        run["records_logged"] * codec["log"]
        + run["agent"]["records_sent"] * codec["encode"]
        + run["records_per_s_all_viewers"] * run["seconds"] * codec["decode"]
    )
    return float(work / run["seconds"])


async def benchmark(
    records: Sequence[Record], n: int, viewers: int, repeat: int, buffers: dict[str, int | None]
) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for name, buffer_records in buffers.items():
        print(f"\nagent buffer: {name} ({buffer_records or 'loupelive default'} records)")
        runs = results[name] = []
        for index in range(repeat):
            relay_run = await run_relay(records, n, viewers, buffer_records)
            delivered = relay_run["records_per_s_per_viewer"] * relay_run["seconds"]
            pipe = await run_pipe(
                relay_run["relay"]["bytes_in"], relay_run["relay"]["batches_in"], viewers, round(delivered)
            )
            ratio = relay_run["records_per_s_per_viewer"] / pipe["records_per_s_per_viewer"]
            codec = await measure_codec(records, min(n, CODEC_SAMPLE), relay_run["mean_batch_records"])
            share = codec_share(relay_run, codec)
            runs.append(
                {
                    "relay": relay_run,
                    "pipe": pipe,
                    "relay_to_pipe": ratio,
                    "codec": codec,
                    "codec_share": share,
                }
            )
            _print_run(index + 1, relay_run, pipe, ratio, codec, share)
    return results


def _print_run(
    index: int, run: dict[str, Any], pipe: dict[str, Any], ratio: float, codec: dict[str, float], share: float
) -> None:
    gaps: Counter[str] = Counter()
    gap_seqs: Counter[str] = Counter()
    for viewer in run["per_viewer"]:
        gaps.update(viewer["gaps"])
        gap_seqs.update(viewer["gap_seqs"])
    gap_text = ", ".join(f"{k} {gaps[k]} gaps/{gap_seqs[k]} seqs" for k in sorted(gaps)) or "none"
    print(
        f"  run {index}: {run['records_per_s_per_viewer']:7.0f} rec/s per viewer "
        f"({run['records_per_s_all_viewers']:.0f} summed) in {run['seconds']:.2f} s, "
        f"delivered {run['delivered_fraction']:.1%}, app logged at {run['log_rate']:.0f} rec/s | "
        f"pipe {pipe['records_per_s_per_viewer']:.0f} rec/s ({pipe['seconds'] * 1000:.1f} ms) | "
        f"relay/pipe {ratio:.4f}"
    )
    print(
        f"         wire {run['wire_bytes_per_record_in']:.1f} B/record in, "
        f"{run['mean_batch_records']:.0f} records/batch ({run['mean_batch_bytes'] / 1024:.1f} KiB); "
        f"RSS {run['rss_before'] / 2**20:.0f}→{run['rss_peak'] / 2**20:.0f} MiB; "
        f"relay queue peak {run['relay']['peak_queued_bytes'] / 2**10:.0f} KiB; "
        f"gaps (all viewers): {gap_text}; continuity errors {run['continuity_errors']}"
    )
    print(
        f"         alone: log {codec['log'] * 1e6:.1f} µs, encode {codec['encode'] * 1e6:.1f} µs, "
        f"decode {codec['decode'] * 1e6:.1f} µs per record → {share:.0%} of this run's wall time"
    )


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str, part: str = "relay") -> float:
        return float(statistics.median(r[part][key] for r in runs))

    def total(counter: str, reason: str) -> int:
        return sum(v[counter].get(reason, 0) for r in runs for v in r["relay"]["per_viewer"])

    return {
        "runs": len(runs),
        "relay_records_per_s_per_viewer_median": median("records_per_s_per_viewer"),
        "relay_records_per_s_per_viewer_all": [r["relay"]["records_per_s_per_viewer"] for r in runs],
        "relay_records_per_s_all_viewers_median": median("records_per_s_all_viewers"),
        "pipe_records_per_s_per_viewer_median": median("records_per_s_per_viewer", "pipe"),
        "pipe_megabytes_per_s_per_receiver_median": median("megabytes_per_s_per_receiver", "pipe"),
        "relay_to_pipe_median": statistics.median(r["relay_to_pipe"] for r in runs),
        "relay_to_pipe_all": [r["relay_to_pipe"] for r in runs],
        "codec_share_median": statistics.median(r["codec_share"] for r in runs),
        "codec_share_all": [r["codec_share"] for r in runs],
        "codec_us_per_record_median": {
            part: statistics.median(r["codec"][part] for r in runs) * 1e6
            for part in ("log", "encode", "decode")
        },
        "log_rate_median": median("log_rate"),
        "seconds_median": median("seconds"),
        "delivered_fraction_median": median("delivered_fraction"),
        "wire_bytes_per_record_in_median": median("wire_bytes_per_record_in"),
        "wire_bytes_per_record_out_median": median("wire_bytes_per_record_out"),
        "rss_before_median": median("rss_before"),
        "rss_peak_max": max(r["relay"]["rss_peak"] for r in runs),
        "relay_peak_queued_bytes_max": max(r["relay"]["relay"]["peak_queued_bytes"] for r in runs),
        "agent_overflow_gaps_total": total("gaps", "agent_overflow"),
        "agent_overflow_seqs_total": total("gap_seqs", "agent_overflow"),
        "viewer_slow_gaps_total": total("gaps", "viewer_slow"),
        "viewer_slow_seqs_total": total("gap_seqs", "viewer_slow"),
        "continuity_errors_total": sum(r["relay"]["continuity_errors"] for r in runs),
    }


def _print_summary(name: str, s: dict[str, Any], viewers: int) -> None:
    print(
        f"{name:>9}: relay {s['relay_records_per_s_per_viewer_median']:7.0f} rec/s per viewer "
        f"({s['relay_records_per_s_all_viewers_median']:.0f} summed over {viewers}), "
        f"delivered {s['delivered_fraction_median']:.1%}; "
        f"pipe {s['pipe_records_per_s_per_viewer_median']:.0f} rec/s "
        f"({s['pipe_megabytes_per_s_per_receiver_median']:.0f} MB/s per receiver); "
        f"relay/pipe {s['relay_to_pipe_median']:.4f} "
        f"(runs {', '.join(f'{x:.4f}' for x in s['relay_to_pipe_all'])})"
    )
    print(
        f"{'':>9}  agent_overflow: {s['agent_overflow_gaps_total']} gaps, "
        f"{s['agent_overflow_seqs_total']} seqs (all runs × viewers); "
        f"viewer_slow: {s['viewer_slow_gaps_total']} gaps; "
        f"continuity errors: {s['continuity_errors_total']}; "
        f"peak RSS {s['rss_peak_max'] / 2**20:.0f} MiB"
    )
    us = s["codec_us_per_record_median"]
    print(
        f"{'':>9}  log + encode + decode alone ({us['log']:.1f} + {us['encode']:.1f} + "
        f"viewers × {us['decode']:.1f} µs per record) = {s['codec_share_median']:.0%} of the wall time"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000, help="records the agent logs per run")
    parser.add_argument("--viewers", type=int, default=3, help="viewers consuming the session")
    parser.add_argument(
        "--corpus", help="directory of *_structured.csv files (default: the shared loghub corpus)"
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "relay.json"), help="JSON output")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per agent configuration (median reported)"
    )
    parser.add_argument(
        "--agent-buffer",
        choices=["default", "holds-all", "both"],
        default="both",
        help="agent ring buffer: loupelive's default (10,000 records), one that holds the whole run, or both",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic records (no corpus)")
    args = parser.parse_args(argv)
    if args.records < 1 or args.viewers < 1 or args.repeat < 1:
        parser.error("--records, --viewers and --repeat must be at least 1")
    buffers: dict[str, int | None] = {}
    if args.agent_buffer in ("default", "both"):
        buffers["default"] = None
    if args.agent_buffer in ("holds-all", "both"):
        buffers["holds-all"] = args.records + 10_000  # the probes fit too

    info = machine_info()
    corpus, source = corpus_or_synthetic(args.corpus, seed=args.seed)
    records = [r for system in corpus.values() for r in system]
    if not records:
        print("the corpus has no records", file=sys.stderr)
        return 1
    print(f"corpus: {source} ({len(corpus)} systems, {len(records)} records, replayed in file order)")
    print(
        f"machine: {info['cpu_count']} CPUs, Python {info['python']}, load {info['load_average']}; "
        f"{args.records} records, {args.viewers} viewers, {args.repeat} runs per configuration"
    )
    results = trio.run(benchmark, records, args.records, args.viewers, args.repeat, buffers)
    summaries = {name: summarize(runs) for name, runs in results.items()}
    print("\nmedians:")
    for name, summary in summaries.items():
        _print_summary(name, summary, args.viewers)
    info["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    result = {
        "benchmark": "relay",
        "machine": info,
        "corpus": source,
        "settings": {
            "records": args.records,
            "viewers": args.viewers,
            "repeat": args.repeat,
            "agent_buffers": buffers,
            "checkpoint_every": CHECKPOINT_EVERY,
            "pipe_transfers": PIPE_TRANSFERS,
        },
        "summary": summaries,
        "runs": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(s["continuity_errors_total"] == 0 for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

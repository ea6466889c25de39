#!/usr/bin/env python3
"""What ``logger.info("msg %d", i)`` costs the application with a ``LiveHandler`` attached.

The timed loop is the application's own thread (this script's main thread)
calling ``logger.info("msg %d", i)`` ``--records`` times on a logger with
exactly one handler, timed with ``time.perf_counter_ns``; the figure is
microseconds per call, the median of ``--rounds`` rounds (one untimed warm-up
first).  Scenarios:

``null``
    only a ``logging.NullHandler``: the cost of ``logging`` itself (level
    check, ``LogRecord``), the baseline every ratio is taken against;
``idle``
    a ``LiveHandler`` whose session is registered with a relay that is up,
    nobody watching;
``streaming``
    the same while one viewer streams the session: ``loupelive tail --format
    json`` in a subprocess, its output read (and checked: every seq exactly
    once, as a record or inside a gap) by a thread of this process;
``relay-down``
    a ``LiveHandler`` pointed at a closed port (it keeps retrying).

``idle`` and ``streaming`` run with the relay in a subprocess (``loupelive
serve``, as in production: the relay is another program) and, with
``--relay thread`` or ``both`` (the default), with the relay in this process
on a thread of its own (its own ``trio.run``), so that its work shares this
process's GIL.  In every placement the viewer is another process and the
handler's agent runs on its own thread, as it always does.

Each round of a scenario is paired with a ``null`` round right before it, in
the same conditions (same relay, same viewer attached); the ratio is the
median of the per-round ratios.

Reference ("the goal"): ``record.getMessage()`` + building a
``loupelive.Record`` from the ``LogRecord`` (as ``emit`` does) +
``deque.append`` (a ring buffer of 10,000) per record, timed over ready-made
``LogRecord`` objects.  ``overhead`` is a scenario's cost minus ``null``'s;
``overhead / reference`` says how close the handler comes to "format the
record and append it to a buffer".

Writes JSON to ``--out`` and prints a table.  A default run takes about a
minute and a half on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import spawn, terminate
from bench_compression import machine_info

import loupelive
from loupelive import LiveHandler, Record, RelayConfig

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
LOGGER_NAME: Final = "bench.handler"
#: How long to wait for a relay, a session or a viewer to be ready.
READY_TIMEOUT: Final = 30.0
#: How long a viewer may take to catch up after a round.
CATCH_UP_TIMEOUT: Final = 60.0
POLL: Final = 0.005
#: The ring buffer of the reference measurement: LiveHandler's default size.
REFERENCE_BUFFER: Final = 10_000


# -- timing ----------------------------------------------------------------------------


def time_logging(logger: logging.Logger, n: int) -> float:
    """Microseconds per ``logger.info("msg %d", i)`` over ``n`` calls."""
    info = logger.info
    gc.collect()
    start = time.perf_counter_ns()
    for i in range(n):
        info("msg %d", i)
    return (time.perf_counter_ns() - start) / n / 1000


def time_reference(records: Sequence[logging.LogRecord]) -> float:
    """Microseconds per getMessage() + loupelive.Record(...) + deque.append."""
    buffer: deque[Record] = deque(maxlen=REFERENCE_BUFFER)
    append = buffer.append
    gc.collect()
    start = time.perf_counter_ns()
    for record in records:
        append(
            Record(
                seq=0,
                timestamp=record.created,
                level=record.levelno,
                logger=record.name,
                message=record.getMessage(),
                thread=record.threadName or "",
                exception=None,
                fields={},
            )
        )
    return (time.perf_counter_ns() - start) / len(records) / 1000


def make_records(logger: logging.Logger, n: int) -> list[logging.LogRecord]:
    return [logger.makeRecord(logger.name, logging.INFO, __file__, 0, "msg %d", (i,), None) for i in range(n)]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- relays ----------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loupelive", "--log-level", "WARNING", *args]


@contextlib.contextmanager
def relay_process() -> Iterator[tuple[int, int]]:
    """``loupelive serve`` on ephemeral loopback ports; yields (agent_port, viewer_port)."""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        proc = spawn(
            cli(
                "serve",
                "--host",
                "127.0.0.1",
                "--agent-port",
                "0",
                "--viewer-port",
                "0",
                "--ready-file",
                str(ready),
            ),
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: ready.exists() or proc.poll() is not None, "the relay's ready file")
            if proc.poll() is not None:
                raise RuntimeError(f"the relay exited with {proc.returncode}")
            info = json.loads(ready.read_text())
            yield info["agent_port"], info["viewer_port"]
        finally:
            terminate(proc)


@contextlib.contextmanager
def relay_thread() -> Iterator[tuple[int, int]]:
    """A relay in this process, on a thread with its own ``trio.run``."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            config = RelayConfig(host="127.0.0.1", agent_port=0, viewer_port=0)
            relay: loupelive.Relay = await nursery.start(loupelive.serve_relay, config)
            stop = trio.Event()
            state.update(relay=relay, stop=stop, token=trio.lowlevel.current_trio_token())
            started.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="bench-relay", daemon=True)
    thread.start()
    started.wait(READY_TIMEOUT)
    if "relay" not in state:
        raise RuntimeError(f"the in-process relay did not start: {state.get('error')!r}")
    try:
        yield state["relay"].agent_port, state["relay"].viewer_port
    finally:
        trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])
        thread.join(READY_TIMEOUT)


RELAYS: Final = {"process": relay_process, "thread": relay_thread}


# -- the viewer ----------------------------------------------------------------------------


class TailViewer:
    """``loupelive tail --format json`` in a subprocess, its output checked by a thread."""

    def __init__(self, viewer_port: int, session_id: str) -> None:
        self.proc = spawn(
            cli("tail", session_id, "--relay", f"127.0.0.1:{viewer_port}", "--format", "json"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        self.records = 0
        self.gaps: dict[str, int] = {}
        self.gap_seqs = 0
        self.covered = 0  # every seq up to here is accounted for
        self.errors = 0
        self.ended = ""
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            obj = json.loads(line)
            kind = obj["type"]
            if kind == "record":
                first = last = int(obj["seq"])
                self.records += 1
            elif kind == "gap":
                first, last = int(obj["first_seq"]), int(obj["last_seq"])
                self.gaps[obj["reason"]] = self.gaps.get(obj["reason"], 0) + 1
                self.gap_seqs += last - first + 1
            else:
                self.ended = str(obj.get("reason", kind))
                continue
            if self.covered and first != self.covered + 1:
                self.errors += 1  # a hole or a repeat: the stream promises neither
            self.covered = max(self.covered, last)

    def wait_covered(self, seq: int) -> None:
        wait_for(lambda: self.covered >= seq, f"the viewer to cover seq {seq}", CATCH_UP_TIMEOUT)

    def finish(self) -> int:
        code = terminate(self.proc, grace=15.0)
        self._reader.join(5.0)
        return code


# -- scenarios -------------------------------------------------------------------------------


def attach(logger: logging.Logger, handler: logging.Handler) -> None:
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)


def paired_rounds(
    logger: logging.Logger,
    handler: logging.Handler,
    n: int,
    rounds: int,
    after_round: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``rounds`` × (a NullHandler round, then a round with ``handler``)."""
    null = logging.NullHandler()
    attach(logger, handler)
    time_logging(logger, min(n, 10_000))  # warm-up
    if after_round is not None:
        after_round()
    null_us: list[float] = []
    us: list[float] = []
    for _ in range(rounds):
        attach(logger, null)
        null_us.append(time_logging(logger, n))
        attach(logger, handler)
        us.append(time_logging(logger, n))
        if after_round is not None:
            after_round()
    attach(logger, null)
    ratios = [a / b for a, b in zip(us, null_us, strict=True)]
    return {
        "us_per_call_median": statistics.median(us),
        "us_per_call_all": us,
        "null_us_per_call_median": statistics.median(null_us),
        "null_us_per_call_all": null_us,
        "ratio_median": statistics.median(ratios),
        "ratio_all": ratios,
    }


def handler_for(agent_port: int, app: str) -> LiveHandler:
    return LiveHandler(f"127.0.0.1:{agent_port}", app=app)


def run_relay_down(logger: logging.Logger, n: int, rounds: int) -> dict[str, Any]:
    handler = LiveHandler(f"127.0.0.1:{free_port()}", app="bench-relay-down", close_timeout=1.0)
    try:
        result = paired_rounds(logger, handler, n, rounds)
        stats = handler.statistics()
        result["status"] = handler.status
        result["records_buffered"] = stats.records_buffered
    finally:
        handler.close()
    return result


def run_idle(logger: logging.Logger, agent_port: int, n: int, rounds: int, placement: str) -> dict[str, Any]:
    handler = handler_for(agent_port, f"bench-idle-{placement}")
    try:
        wait_for(lambda: handler.status == "connected", "the session to be registered")
        result = paired_rounds(logger, handler, n, rounds)
        stats = handler.statistics()
        result["status"] = handler.status
        result["records_sent"] = stats.records_sent
    finally:
        handler.close()
    return result


def run_streaming(
    logger: logging.Logger, agent_port: int, viewer_port: int, n: int, rounds: int, placement: str
) -> dict[str, Any]:
    handler = handler_for(agent_port, f"bench-streaming-{placement}")
    viewer: TailViewer | None = None
    try:
        wait_for(lambda: handler.status == "connected", "the session to be registered")
        viewer = TailViewer(viewer_port, handler.session_id)

        def live() -> bool:
            stats = handler.statistics()
            return stats.streaming and stats.viewers == 1

        wait_for(live, "the viewer's stream to start")
        # Everything logged so far was before the viewer (it asked for no
        # history): it starts at the next seq.
        start_seq = handler.statistics().records_logged + 1
        tail = viewer

        def catch_up() -> None:
            tail.wait_covered(handler.statistics().records_logged)

        result = paired_rounds(logger, handler, n, rounds, after_round=catch_up)
        stats = handler.statistics()
        handler.close()
        wait_for(lambda: bool(tail.ended), "the viewer to see the session end", CATCH_UP_TIMEOUT)
        logged = stats.records_logged - start_seq + 1
        result.update(
            records_logged_while_watched=logged,
            records_delivered=viewer.records,
            delivered_fraction=viewer.records / logged if logged else 1.0,
            gaps=viewer.gaps,
            gap_seqs=viewer.gap_seqs,
            continuity_errors=viewer.errors,
            agent_records_dropped=stats.records_dropped,
            agent_batches_sent=stats.batches_sent,
            viewer_end=viewer.ended,
        )
    finally:
        handler.close()
        if viewer is not None:
            viewer.finish()
    return result


# -- report ----------------------------------------------------------------------------------


def summarize(scenarios: dict[str, dict[str, Any]], reference_us: float) -> None:
    for result in scenarios.values():
        overhead = result["us_per_call_median"] - result["null_us_per_call_median"]
        result["overhead_us"] = overhead
        result["overhead_vs_reference"] = overhead / reference_us


def print_table(scenarios: dict[str, dict[str, Any]], reference_us: float, null_us: float) -> None:
    print()
    print(
        f"{'scenario':<28} {'µs/call':>8} {'null µs':>8} {'ratio':>6} {'overhead µs':>12} {'÷ reference':>12}"
    )
    print(f"{'null (NullHandler only)':<28} {null_us:8.2f} {null_us:8.2f} {1.0:6.2f} {0.0:12.2f} {'':>12}")
    print(
        f"{'reference (fmt+Record+append)':<28} {reference_us:8.2f} {'':>8} {'':>6} {reference_us:12.2f} {1.0:12.2f}"
    )
    for name, r in scenarios.items():
        print(
            f"{name:<28} {r['us_per_call_median']:8.2f} {r['null_us_per_call_median']:8.2f} "
            f"{r['ratio_median']:6.2f} {r['overhead_us']:12.2f} {r['overhead_vs_reference']:12.2f}"
        )
    for name, r in scenarios.items():
        if "records_delivered" in r:
            gaps = ", ".join(f"{k}: {v}" for k, v in r["gaps"].items()) or "none"
            print(
                f"  {name}: viewer got {r['records_delivered']} of {r['records_logged_while_watched']} records "
                f"({r['delivered_fraction']:.1%}); gaps {gaps} ({r['gap_seqs']} seqs); "
                f"continuity errors {r['continuity_errors']}; end: {r['viewer_end']}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="logging calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per scenario (median reported)")
    parser.add_argument(
        "--relay",
        choices=["process", "thread", "both"],
        default="both",
        help="where the relay of the idle and streaming scenarios runs",
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "handler.json"), help="JSON output")
    args = parser.parse_args(argv)
    if args.records < 1 or args.rounds < 1:
        parser.error("--records and --rounds must be at least 1")
    placements = ["process", "thread"] if args.relay == "both" else [args.relay]

    info = machine_info()
    print(
        f"machine: {info['cpu_count']} CPUs, Python {info['python']}, load {info.get('load_average')}; "
        f"{args.records} calls per round, {args.rounds} rounds"
    )
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # The handlers' own reports (relay unreachable, ...) stay quiet.
    logging.getLogger("loupelive").setLevel(logging.CRITICAL)

    attach(logger, logging.NullHandler())
    time_logging(logger, min(args.records, 10_000))
    null_all = [time_logging(logger, args.records) for _ in range(args.rounds)]
    records = make_records(logger, args.records)
    time_reference(records[:10_000])
    reference_all = [time_reference(records) for _ in range(args.rounds)]
    del records
    null_us = statistics.median(null_all)
    reference_us = statistics.median(reference_all)
    print(f"null handler {null_us:.2f} µs/call; reference {reference_us:.2f} µs/record")

    scenarios: dict[str, dict[str, Any]] = {}
    for placement in placements:
        with RELAYS[placement]() as (agent_port, viewer_port):
            name = f"idle (relay {placement})"
            scenarios[name] = run_idle(logger, agent_port, args.records, args.rounds, placement)
            print(f"{name}: {scenarios[name]['us_per_call_median']:.2f} µs/call")
            name = f"streaming (relay {placement})"
            scenarios[name] = run_streaming(
                logger, agent_port, viewer_port, args.records, args.rounds, placement
            )
            print(f"{name}: {scenarios[name]['us_per_call_median']:.2f} µs/call")
    scenarios["relay down"] = run_relay_down(logger, args.records, args.rounds)
    print(f"relay down: {scenarios['relay down']['us_per_call_median']:.2f} µs/call")

    summarize(scenarios, reference_us)
    print_table(scenarios, reference_us, null_us)

    info["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    result = {
        "benchmark": "handler",
        "machine": info,
        "settings": {"records": args.records, "rounds": args.rounds, "relay": placements},
        "null_us_per_call_median": null_us,
        "null_us_per_call_all": null_all,
        "reference_us_per_record_median": reference_us,
        "reference_us_per_record_all": reference_all,
        "reference": "record.getMessage() + loupelive.Record(...) + deque(maxlen=10000).append",
        "scenarios": scenarios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    errors = sum(r.get("continuity_errors", 0) for r in scenarios.values())
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

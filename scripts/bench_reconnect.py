#!/usr/bin/env python3
"""Time from a relay restart to every agent re-registered and every viewer resumed.

A real relay subprocess (``python -m loupelive serve``) serves N agents and V
watched sessions (one viewer each), all real client code in this process.  The
relay is killed (SIGKILL, the worst case: nobody is told) and started again on
the same ports.  Measured from the restart:

* ``registered_s``: until the relay lists all N sessions again (seen by a
  viewer's session list, which itself reconnects);
* ``resumed_s``: until every watched stream has delivered a record logged after
  the restart, with no seq lost or repeated (checked).

Agents retry with jittered exponential backoff capped at 5 s, so the worst case
is bounded by the cap plus the work of N registrations.

    python scripts/bench_reconnect.py --agents 1000 --watched 50 [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import loupelive
from loupelive import Level, Record

ROOT = Path(__file__).resolve().parent.parent


def start_relay(ready: Path, agent_port: int = 0, viewer_port: int = 0) -> subprocess.Popen[bytes]:
    ready.unlink(missing_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loupelive",
            "--log-level",
            "warning",
            "serve",
            "--agent-port",
            str(agent_port),
            "--viewer-port",
            str(viewer_port),
            "--ready-file",
            str(ready),
            "--agent-grace",
            "60",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_ready(ready: Path) -> dict[str, Any]:
    while not ready.exists():
        await trio.sleep(0.01)
    return json.loads(ready.read_text())  # type: ignore[no-any-return]


async def run(agents: int, watched: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        relay = start_relay(ready)
        try:
            ports = await wait_ready(ready)
            agent_port, viewer_port = ports["agent_port"], ports["viewer_port"]
            async with contextlib.AsyncExitStack() as stack:
                opened = []
                for i in range(agents):
                    opened.append(
                        await stack.enter_async_context(
                            loupelive.open_agent("127.0.0.1", agent_port, app=f"bench-{i}")
                        )
                    )
                viewer = await stack.enter_async_context(loupelive.open_viewer("127.0.0.1", viewer_port))
                await viewer.wait_sessions(lambda ss: len(ss) == agents)
                nursery = await stack.enter_async_context(trio.open_nursery())
                seqs: list[list[int]] = [[] for _ in range(watched)]
                gaps: list[int] = [0]

                async def watch(index: int, session_id: str) -> None:
                    async with viewer.open_stream(session_id) as stream:
                        async for item in stream:
                            if isinstance(item, Record):
                                seqs[index].append(item.seq)
                            else:
                                gaps[0] += 1

                for index in range(watched):
                    nursery.start_soon(watch, index, opened[index].session_id)

                async def log_forever() -> None:
                    while True:
                        for agent in opened[:watched]:
                            agent.log(Level.INFO, "tick")
                        await trio.sleep(0.05)

                nursery.start_soon(log_forever)
                while not all(seqs):
                    await trio.sleep(0.01)
                os.killpg(relay.pid, signal.SIGKILL)
                relay.wait()
                relay = start_relay(ready, agent_port, viewer_port)
                restarted = time.monotonic()
                await wait_ready(ready)
                marks = [agent.statistics().records_logged for agent in opened[:watched]]
                await viewer.wait_sessions(
                    lambda ss: len(ss) == agents and all(s.status == "running" for s in ss)
                )
                registered = time.monotonic() - restarted
                while not all(s and s[-1] > mark for s, mark in zip(seqs, marks, strict=True)):
                    await trio.sleep(0.005)
                resumed = time.monotonic() - restarted
                nursery.cancel_scope.cancel()
            ok = all(s == list(range(s[0], s[0] + len(s))) for s in seqs)
            return {
                "agents": agents,
                "watched": watched,
                "registered_s": round(registered, 3),
                "resumed_s": round(resumed, 3),
                "streams_continuous": ok,
                "gaps": gaps[0],
            }
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(relay.pid, signal.SIGKILL)
            relay.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--watched", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "reconnect.json"))
    args = parser.parse_args()
    result = trio.run(run, args.agents, args.watched)
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not result["streams_continuous"] or result["gaps"]:
        raise SystemExit("a resumed stream lost or repeated records")


if __name__ == "__main__":
    main()

"""Relays that form a cluster over NATS: real ``nats-server`` processes on free ports.

Relays run in-process (``serve_relay`` with ``cluster`` set) or as ``serve
--cluster`` subprocesses where one must die by SIGKILL; agents and viewers are
the real clients on loopback TCP.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import loupelive
from loupelive.records import Gap, Record

from .cli_helpers import Child, run_child, start_relay
from .conftest import test_config, wait_until

# Skipped where nats-server is missing, except in CI (which installs it): a
# silent skip there would hide breakage.
pytestmark = pytest.mark.skipif(
    shutil.which("nats-server") is None and not os.environ.get("CI"), reason="nats-server is not installed"
)

#: Cluster tests wait for NATS round trips and a relay's death notice.
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def nats_server(
    port: int | None = None, *, cluster_port: int | None = None, routes: tuple[int, ...] = ()
) -> AsyncIterator[tuple[Child, str]]:
    """A ``nats-server`` on 127.0.0.1; yields it with its URL once it is ready."""
    port = port or free_port()
    argv = ["nats-server", "-a", "127.0.0.1", "-p", str(port)]
    if cluster_port is not None:
        argv += ["--cluster_name", "loupe-test", "--cluster", f"nats://127.0.0.1:{cluster_port}"]
        if routes:
            argv += ["--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes)]
    async with run_child(argv) as child:
        await child.stderr.wait_for_line(r"Server is ready", "nats-server ready")
        yield child, f"nats://127.0.0.1:{port}"


async def start_cluster_relay(
    nursery: trio.Nursery, url: str, name: str, **overrides: Any
) -> loupelive.Relay:
    config = test_config(cluster=url, relay_name=name, cluster_timeout=1.5, **overrides)
    relay: loupelive.Relay = await nursery.start(loupelive.serve_relay, config)
    await relay.cluster.bridge.first_connect.wait()
    return relay


async def wait_peers(*relays: loupelive.Relay) -> None:
    """Every relay has heard from every other (so directory traffic flows)."""
    names = {r.cluster.name for r in relays}
    for relay in relays:
        others = names - {relay.cluster.name}
        await relay.cluster.wait_until(lambda relay=relay, others=others: set(relay.cluster.peers) >= others)


async def collect(stream: Any, count: int) -> list[Record | Gap]:
    items: list[Record | Gap] = []
    async for item in stream:
        items.append(item)
        if sum(isinstance(i, Record) for i in items) >= count:
            break
    return items


def seqs(items: list[Record | Gap]) -> list[int]:
    return [i.seq for i in items if isinstance(i, Record)]


async def watch_and_check(viewer_relay: loupelive.Relay, agent_relay: loupelive.Relay) -> None:
    """An agent on one relay, a viewer on another: every record once, in order."""
    async with loupelive.open_agent("127.0.0.1", agent_relay.agent_port, app="far-away") as agent:
        before = [agent.log(loupelive.Level.INFO, f"before {i}") for i in range(50)]
        async with loupelive.open_viewer("127.0.0.1", viewer_relay.viewer_port) as viewer:
            info = await viewer.wait_for_session("far-away")
            assert info.relay == agent_relay.cluster.name
            assert info.session_id == agent.session_id
            async with viewer.open_stream(agent.session_id, history=20) as stream:
                history = await collect(stream, 20)
                assert seqs(history) == before[-20:]
                live = [
                    agent.log(loupelive.Level.WARNING if i % 7 else loupelive.Level.ERROR, f"live {i}")
                    for i in range(300)
                ]
                items = await collect(stream, 300)
            assert not [i for i in items if isinstance(i, Gap)], items
            assert seqs(items) == live
            # Counters cross the cluster too (at most once a second).
            final = await viewer.wait_sessions(
                lambda ss: any(s.session_id == agent.session_id and s.records == 350 for s in ss)
            )
            (seen,) = [s for s in final if s.session_id == agent.session_id]
            assert (seen.records, seen.errors) == (350, 43)


# -- single relay: no NATS anywhere ---------------------------------------------------------


async def test_single_relay_runs_without_nats_installed(tmp_path: Path) -> None:
    """No ``--cluster``: nothing imports nats or trio_asyncio (they may be absent)."""
    script = tmp_path / "single.py"
    script.write_text(
        "import sys\n"
        "sys.modules['nats'] = None  # an import of it would fail\n"
        "sys.modules['trio_asyncio'] = None\n"
        "import trio, loupelive\n"
        "from loupelive.testing import TEST_DEFAULTS\n"
        "async def main():\n"
        "    async with trio.open_nursery() as n:\n"
        "        relay = await n.start(loupelive.serve_relay, loupelive.RelayConfig(**TEST_DEFAULTS))\n"
        "        async with loupelive.open_agent('127.0.0.1', relay.agent_port, app='solo') as agent:\n"
        "            agent.log(20, 'hello')\n"
        "            async with loupelive.open_viewer('127.0.0.1', relay.viewer_port) as v:\n"
        "                async with v.open_stream(agent.session_id, history=5) as s:\n"
        "                    item = await anext(s)\n"
        "                    print('got', item.message, relay.cluster)\n"
        "        n.cancel_scope.cancel()\n"
        "trio.run(main)\n"
    )
    with trio.fail_after(TIMEOUT):
        async with run_child([sys.executable, str(script)]) as child:
            assert await child.wait() == 0, child.describe()
            assert child.stdout.text.strip() == "got hello None", child.describe()


# -- three relays ------------------------------------------------------------------------


async def test_three_relays_on_one_nats_server(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        async with nats_server() as (_server, url):
            a = await start_cluster_relay(nursery, url, "A")
            b = await start_cluster_relay(nursery, url, "B")
            c = await start_cluster_relay(nursery, url, "C")
            await wait_peers(a, b, c)
            await watch_and_check(c, a)
            # The lists converge everywhere: the session is gone on all relays.
            for relay in (b, c):
                await relay.cluster.wait_until(lambda relay=relay: not relay.cluster.remote)
            assert not a.sessions
            stats = c.statistics().cluster
            assert stats["feed_bytes_in"] > 0 and stats["feed_holes"] == 0
            assert stats["peers"] == ["A", "B"]
            assert a.statistics().cluster["feed_bytes_out"] == stats["feed_bytes_in"]
            # Nothing crossed NATS to B, which had no viewers.
            assert b.statistics().cluster["feed_bytes_in"] == 0


async def test_session_lists_converge_and_show_the_owner(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        async with nats_server() as (_server, url):
            a = await start_cluster_relay(nursery, url, "A")
            b = await start_cluster_relay(nursery, url, "B")
            await wait_peers(a, b)
            async with (
                loupelive.open_agent("127.0.0.1", a.agent_port, app="on-a") as on_a,
                loupelive.open_agent("127.0.0.1", b.agent_port, app="on-b") as on_b,
                loupelive.open_viewer("127.0.0.1", a.viewer_port) as viewer_a,
                loupelive.open_viewer("127.0.0.1", b.viewer_port) as viewer_b,
            ):
                for viewer in (viewer_a, viewer_b):
                    sessions = await viewer.wait_sessions(lambda ss: len(ss) == 2)
                    assert {(s.app, s.relay) for s in sessions} == {("on-a", "A"), ("on-b", "B")}
                # A relay that joins late gets the whole directory.
                c = await start_cluster_relay(nursery, url, "C")
                async with loupelive.open_viewer("127.0.0.1", c.viewer_port) as viewer_c:
                    sessions = await viewer_c.wait_sessions(lambda ss: len(ss) == 2)
                    assert {s.session_id for s in sessions} == {on_a.session_id, on_b.session_id}
                    assert {s.relay for s in sessions} == {"A", "B"}


async def test_three_relays_on_a_three_node_nats_cluster(nursery: trio.Nursery) -> None:
    ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    with trio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            urls = []
            for i in range(3):
                _child, url = await stack.enter_async_context(
                    nats_server(
                        ports[i],
                        cluster_port=cluster_ports[i],
                        routes=tuple(p for p in cluster_ports if p != cluster_ports[i]),
                    )
                )
                urls.append(url)
            # Each relay talks to its own NATS node; NATS routes between them.
            a = await start_cluster_relay(nursery, urls[0], "A")
            b = await start_cluster_relay(nursery, urls[1], "B")
            c = await start_cluster_relay(nursery, urls[2], "C")
            await wait_peers(a, b, c)
            await watch_and_check(c, a)


# -- failures ---------------------------------------------------------------------------------


async def test_relay_killed_agent_moves_and_the_remote_viewer_resumes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nats_server() as (_server, url):
            b = await start_cluster_relay(nursery, url, "B")
            c = await start_cluster_relay(nursery, url, "C")
            async with start_relay(
                tmp_path,
                "--cluster",
                url,
                "--relay-name",
                "A",
                "--cluster-timeout",
                "1.5",
                "--agent-grace",
                "30",
            ) as a:
                await c.cluster.wait_until(lambda: "A" in c.cluster.peers)
                async with loupelive.open_agent(
                    "127.0.0.1", a.agent_port, app="mover", fallbacks=[("127.0.0.1", b.agent_port)]
                ) as agent:
                    async with loupelive.open_viewer("127.0.0.1", c.viewer_port) as viewer:
                        info = await viewer.wait_for_session("mover")
                        assert info.relay == "A"
                        async with viewer.open_stream(agent.session_id, history=1000) as stream:
                            first = [agent.log(loupelive.Level.INFO, f"on A {i}") for i in range(100)]
                            items = await collect(stream, 100)
                            assert seqs(items) == first
                            # Relay A dies mid-stream; records keep coming.
                            a.child.send_signal(signal.SIGKILL)
                            await a.child.wait()
                            during = [agent.log(loupelive.Level.INFO, f"during {i}") for i in range(100)]
                            moved = await viewer.wait_sessions(
                                lambda ss: any(
                                    s.session_id == agent.session_id and s.relay == "B" for s in ss
                                )
                            )
                            assert moved
                            after = [agent.log(loupelive.Level.INFO, f"on B {i}") for i in range(100)]
                            items = await collect(stream, 200)
                            gaps = [i for i in items if isinstance(i, Gap)]
                            assert not gaps, gaps
                            assert seqs(items) == during + after
                    assert (agent.host, agent.port) == ("127.0.0.1", b.agent_port)


async def test_nats_restart_relays_reconnect_and_the_directory_converges(nursery: trio.Nursery) -> None:
    port = free_port()
    with trio.fail_after(TIMEOUT):
        async with nats_server(port) as (server, url):
            a = await start_cluster_relay(nursery, url, "A")
            b = await start_cluster_relay(nursery, url, "B")
            await wait_peers(a, b)
            server.send_signal(signal.SIGKILL)
            await server.wait()
        async with loupelive.open_agent("127.0.0.1", a.agent_port, app="during-outage") as agent:
            # Registered while NATS is down: B learns of it after NATS is back.
            async with nats_server(port):
                async with loupelive.open_viewer("127.0.0.1", b.viewer_port) as viewer:
                    info = await viewer.wait_for_session("during-outage")
                    assert (info.session_id, info.relay) == (agent.session_id, "A")
                assert a.cluster.bridge.reconnects >= 1 and b.cluster.bridge.reconnects >= 1


async def test_a_stalled_nats_never_blocks_the_owner_and_losses_are_cluster_overflow_gaps(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nats_server() as (server, url):
            a = await start_cluster_relay(nursery, url, "A", viewer_queue_bytes=256 * 1024)
            c = await start_cluster_relay(nursery, url, "C")
            await wait_peers(a, c)
            async with (
                loupelive.open_agent(
                    "127.0.0.1",
                    a.agent_port,
                    app="flood",
                    buffer_records=200_000,
                    buffer_bytes=256 * 1024 * 1024,
                ) as agent,
                loupelive.open_viewer("127.0.0.1", a.viewer_port) as local_viewer,
                loupelive.open_viewer("127.0.0.1", c.viewer_port) as remote_viewer,
            ):
                await remote_viewer.wait_for_session("flood")
                async with (
                    local_viewer.open_stream(agent.session_id, history=10) as local,
                    remote_viewer.open_stream(agent.session_id, history=10) as remote,
                ):
                    first = agent.log(loupelive.Level.INFO, "start")
                    assert seqs(await collect(local, 1)) == [first]
                    assert seqs(await collect(remote, 1)) == [first]
                    # NATS stops reading (its process is stopped): the owner's
                    # local viewer still gets everything at once.
                    server.send_signal(signal.SIGSTOP)
                    try:
                        flood = []
                        for i in range(20_000):
                            # Incompressible, so the wire carries it all.
                            flood.append(
                                agent.log(loupelive.Level.INFO, f"flood {i} " + secrets.token_hex(500))
                            )
                            if i % 500 == 0:
                                await trio.lowlevel.checkpoint()
                        got = await collect(local, len(flood))
                        assert seqs(got) == flood
                        assert a.statistics().cluster["cluster_overflows"] >= 1
                    finally:
                        server.send_signal(signal.SIGCONT)
                    last = agent.log(loupelive.Level.INFO, "after")
                    # The remote viewer: records and cluster_overflow gaps that
                    # account for every seq exactly once, in order.
                    covered: list[int] = []
                    reasons = set()
                    async for item in remote:
                        if isinstance(item, Gap):
                            covered.extend(range(item.first_seq, item.last_seq + 1))
                            reasons.add(item.reason)
                        else:
                            covered.append(item.seq)
                        if covered and covered[-1] == last:
                            break
                    assert covered == [*flood, last], (
                        remote.end_code,
                        remote.end_reason,
                        c.statistics().cluster,
                        a.statistics().cluster,
                    )
                    # What the owner skipped arrives as cluster_overflow gaps
                    # (or, if NATS itself dropped messages, is resumed from
                    # the agent's buffer: then nothing is missing at all).
                    assert reasons <= {"cluster_overflow"}
            assert a.statistics().cluster["cluster_overflow_gaps"] >= 1


async def test_one_feed_per_watching_relay_and_it_stops_with_the_last_viewer(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        async with nats_server() as (_server, url):
            a = await start_cluster_relay(nursery, url, "A", stream_grace=0.2)
            c = await start_cluster_relay(nursery, url, "C")
            await wait_peers(a, c)
            async with (
                loupelive.open_agent("127.0.0.1", a.agent_port, app="shared") as agent,
                loupelive.open_viewer("127.0.0.1", c.viewer_port) as viewer,
            ):
                await viewer.wait_for_session("shared")
                session = a.sessions[agent.session_id]
                async with (
                    viewer.open_stream(agent.session_id, history=10) as first,
                    viewer.open_stream(agent.session_id, history=10) as second,
                ):
                    seq = agent.log(loupelive.Level.INFO, "for both")
                    assert seqs(await collect(first, 1)) == [seq]
                    assert seqs(await collect(second, 1)) == [seq]
                    # Two viewers on C, one feed from A to C.
                    assert list(session.hub.feeds) == ["C"]
                    assert len(session.hub.feeds["C"].ids) == 2
                    assert session.public_info().viewers == 2
                    sent = session.hub.feeds["C"].bytes_sent
                    more = [agent.log(loupelive.Level.INFO, f"more {i}") for i in range(50)]
                    assert seqs(await collect(first, 50)) == more
                    assert seqs(await collect(second, 50)) == more
                    # Each batch crossed NATS once, not once per viewer.
                    assert session.hub.feeds["C"].bytes_sent - sent < session.hub.bytes_in * 1.5
                # The last viewer left: the feed goes, then the stream stops.
                await wait_until(lambda: not session.hub.feeds and session.data_conn is None)
                assert agent.statistics().streaming is False

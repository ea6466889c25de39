"""Flow control: slow viewers never hold anyone back; every loss is counted and shown.

Most tests run the real relay, agent and viewer over in-memory streams
(``Relay.memory_connector``) under an autojump clock, so timers run in virtual
time and "no clock time passed" is something a test can assert.
"""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

import loupelive
from loupelive import ErrorCode, Gap, Level, Record
from loupelive.messages import Accept, Close, GapNotice, Heartbeat, Hello, Role, decode_message
from loupelive.records import BatchDecoder
from loupelive.wire import FrameKind

from .conftest import TEST_TIMEOUT, RawPeer, Sink, test_config, wait_until

#: Under the autojump clock, fail_after counts virtual seconds too: leave room
#: for the slow-viewer timeout these tests wait through.
VIRTUAL_TIMEOUT = 600


@pytest.fixture
async def mem_relay(nursery: trio.Nursery) -> loupelive.Relay:
    config = test_config(viewer_queue_bytes=64 * 1024, slow_viewer_timeout=30.0, send_timeout=60.0)
    return await nursery.start(loupelive.serve_relay, config)  # type: ignore[no-any-return]


def agent_of(relay: loupelive.Relay, **kwargs: object) -> AsyncIterator[loupelive.Agent]:
    return loupelive.open_agent(connector=relay.memory_connector("agent"), app="flow", **kwargs)  # type: ignore[arg-type, return-value]


def viewer_of(relay: loupelive.Relay) -> AsyncIterator[loupelive.Viewer]:
    return loupelive.open_viewer(connector=relay.memory_connector("viewer"))  # type: ignore[return-value]


# pytest-trio takes the clock from the test's own arguments, so every test that
# needs virtual time asks for ``autojump_clock`` itself.


async def test_a_trickle_is_sent_at_once_in_virtual_time(
    mem_relay: loupelive.Relay, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            agent_of(mem_relay) as agent,
            viewer_of(mem_relay) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().streaming and agent.statistics().viewers == 1)
            for i in range(5):
                await trio.testing.wait_all_tasks_blocked()
                sent_at = trio.current_time()
                agent.log(Level.INFO, f"trickle {i}")
                item = await anext(stream)
                # No batching timer, no waiting for a batch to fill.
                assert trio.current_time() == sent_at
                assert isinstance(item, Record) and item.message == f"trickle {i}"
            # One batch per record, plus the empty history batch at the start
            # and the empty sync batch after it (it makes the viewer live at
            # once, without waiting for a record).
            assert agent.statistics().batches_sent == 7


async def test_a_flood_batches_itself(mem_relay: loupelive.Relay) -> None:
    count = 20_000
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            agent_of(mem_relay, buffer_records=count) as agent,
            viewer_of(mem_relay) as viewer,
            viewer.open_stream(agent.session_id) as stream,
            trio.open_nursery() as nursery,
        ):
            sink = Sink()
            nursery.start_soon(sink.run, stream)
            await wait_until(lambda: agent.statistics().streaming and agent.statistics().viewers == 1)
            for i in range(count):
                agent.log(Level.INFO, f"flood record number {i} with some text", logger="flood")
                if i % 1000 == 0:
                    await trio.lowlevel.checkpoint()
            await sink.wait_count(count)
            nursery.cancel_scope.cancel()
        assert sink.seqs() == list(range(1, count + 1))
        # Records logged while a send was in flight went out together.
        assert agent.statistics().batches_sent < count / 50


async def test_agent_overflow_is_an_exact_gap(mem_relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            agent_of(mem_relay, buffer_records=100) as agent,
            viewer_of(mem_relay) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().streaming and agent.statistics().viewers == 1)
            await trio.testing.wait_all_tasks_blocked()
            # 1,000 records in one synchronous burst: the streamer cannot run in
            # between, and the ring buffer keeps only the last 100.
            for i in range(1000):
                agent.log(Level.INFO, f"burst {i}")
            first = await anext(stream)
            assert first == Gap(1, 900, "agent_overflow")
            rest = [await anext(stream) for _ in range(100)]
            assert [r.seq for r in rest if isinstance(r, Record)] == list(range(901, 1001))
            stats = agent.statistics()
            assert stats.records_dropped == 900
            assert stats.records_buffered == 100


def noise(i: int) -> str:
    """~250 bytes that do not compress: the queues fill after a few records."""
    return f"{i:06d} " + "".join(random.Random(i).choices(string.ascii_letters + string.digits, k=240))


async def _read_raw_stream(peer: RawPeer, into: list[object]) -> None:
    decoder = BatchDecoder()
    while True:
        event = await peer.next_event()
        if event is None:
            return
        if not hasattr(event, "kind"):
            continue
        if event.kind is FrameKind.BATCH:  # type: ignore[union-attr]
            _header, records = decoder.decode(event.payload)  # type: ignore[union-attr]
            into.extend(records)
        elif event.kind is not FrameKind.HEARTBEAT:  # type: ignore[union-attr]
            into.append(decode_message(event))  # type: ignore[arg-type]


async def test_stalled_viewer_is_isolated_bounded_told_and_closed(
    mem_relay: loupelive.Relay, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    relay = mem_relay
    budget = relay.config.viewer_queue_bytes
    count = 4000
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with (
            agent_of(relay, buffer_records=count) as agent,
            viewer_of(relay) as viewer,
            viewer.open_stream(agent.session_id) as fast_stream,
            trio.open_nursery() as inner,
        ):
            # The stalled viewer: a lockstep stream nobody reads until later.
            client, server = trio.testing.lockstep_stream_pair()
            nursery.start_soon(relay.handle_viewer_connection, server)
            stalled = RawPeer(client)
            assert isinstance(
                await stalled.handshake(Hello(role=Role.VIEWER_DATA, session_id=agent.session_id)), Accept
            )

            async def keep_alive() -> None:
                # Alive (it heartbeats) but not reading: a consumer that fell behind.
                while True:
                    await trio.sleep(relay.config.heartbeat_interval)
                    await stalled.send_message(Heartbeat())

            inner.start_soon(keep_alive)
            fast = Sink()
            inner.start_soon(fast.run, fast_stream)
            await wait_until(lambda: agent.statistics().viewers == 2)
            peak = 0
            for i in range(count):
                agent.log(Level.INFO, noise(i))
                if i % 20 == 0:
                    await trio.testing.wait_all_tasks_blocked()
                    detail = relay.statistics(detail=True).session_details[0]
                    peak = max(peak, max(v.queued_bytes for v in detail.viewers))
            await fast.wait_count(count)
            # The fast viewer got everything, in order, with no gap.
            assert fast.seqs() == list(range(1, count + 1))
            assert not [i for i in fast.items if isinstance(i, Gap)]
            # The stalled viewer's queue stayed within budget (plus one batch).
            assert peak <= budget + 64 * 1024
            stats = relay.statistics()
            assert stats.batches_dropped > 0
            # It stays behind past slow_viewer_timeout (virtual time) …
            await trio.sleep(relay.config.slow_viewer_timeout + 1)
            assert relay.statistics().slow_consumer_disconnects == 1
            # … and when it finally reads, it learns exactly what it lost, and why.
            received: list[object] = []
            await _read_raw_stream(stalled, received)
            seqs = [r.seq for r in received if isinstance(r, Record)]
            gaps = [g for g in received if isinstance(g, GapNotice)]
            assert len(gaps) == 1
            assert gaps[0].reason == "viewer_slow"
            assert seqs == list(range(1, gaps[0].first_seq))
            assert gaps[0].last_seq == count
            assert isinstance(received[-1], Close)
            assert received[-1].code is ErrorCode.SLOW_CONSUMER
            inner.cancel_scope.cancel()


async def test_slow_consumer_close_is_reported_by_the_client(
    mem_relay: loupelive.Relay, autojump_clock: trio.testing.MockClock
) -> None:
    relay = mem_relay
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with (
            agent_of(relay, buffer_records=5000) as agent,
            viewer_of(relay) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            # The client does not read while the agent floods …
            for i in range(5000):
                agent.log(Level.INFO, noise(i))
                if i % 20 == 0:
                    await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(relay.config.slow_viewer_timeout + 1)
            # … then reads: what was queued, one gap, then a clear error.
            items: list[Record | Gap] = []

            async def read_all() -> None:
                async for item in stream:
                    items.append(item)

            with pytest.raises(loupelive.ConnectionClosed) as exc_info:
                await read_all()
            assert exc_info.value.code is ErrorCode.SLOW_CONSUMER
            assert "slow consumer" in exc_info.value.reason
            gaps = [i for i in items if isinstance(i, Gap)]
            assert [g.reason for g in gaps] == ["viewer_slow"]

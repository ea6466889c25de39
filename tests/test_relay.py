"""The relay over real loopback TCP, driven by the real agent and viewer clients."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

import loupelive
from loupelive import Gap, Level, Record

from .conftest import TEST_TIMEOUT, Sink, collect, test_config, wait_until


async def test_registration_and_session_list_updates(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer:
            assert viewer.sessions() == []
            events = viewer.session_events()
            async with loupelive.open_agent(
                "127.0.0.1", relay.agent_port, app="billing", app_version="1.2", tags={"env": "test"}
            ) as agent:
                event = await anext(events)
                assert isinstance(event, loupelive.SessionAdded)
                info = event.session
                assert info.session_id == agent.session_id
                assert (info.app, info.app_version, info.tags) == ("billing", "1.2", {"env": "test"})
                assert info.pid > 0 and info.host and info.started_at > 0 and info.connected_at > 0
                assert info.viewers == 0 and not info.streaming
                assert [s.session_id for s in viewer.sessions()] == [agent.session_id]
                # A second viewer connecting now gets the snapshot.
                async with loupelive.open_viewer("127.0.0.1", relay.viewer_port) as other:
                    assert [s.app for s in other.sessions()] == ["billing"]
            while True:
                event = await anext(events)
                if isinstance(event, loupelive.SessionEnded):
                    break
            assert event.session_id == agent.session_id
            assert event.reason == "session_ended"
            assert viewer.sessions() == []
            await events.aclose()


async def test_stream_starts_only_when_watched_and_stops_after_last_viewer(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="quiet") as agent:
            for i in range(100):
                agent.log(Level.INFO, f"unwatched {i}")
            # Nobody watches: no data connection, nothing sent.
            await trio.testing.wait_all_tasks_blocked()
            assert not agent.statistics().streaming
            assert relay.statistics().streaming_sessions == 0
            assert agent.statistics().bytes_sent == 0
            async with loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer:
                async with viewer.open_stream(agent.session_id) as stream:
                    await agent._streaming.wait_value(True)
                    agent.log(Level.INFO, "watched")
                    [item] = await collect(stream, 1)
                    assert isinstance(item, Record) and item.message == "watched" and item.seq == 101
                    assert relay.statistics().streaming_sessions == 1
                    changed = [s for s in viewer.sessions() if s.session_id == agent.session_id]
                    await viewer.wait_sessions(lambda ss: any(s.streaming and s.viewers == 1 for s in ss))
                    assert changed
            # The last viewer left (grace 0): the relay stops the stream.
            await agent._streaming.wait_value(False)
            await wait_until(lambda: relay.statistics().streaming_sessions == 0)


async def test_two_viewers_receive_every_record_in_order(relay: loupelive.Relay) -> None:
    count = 3000
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="busy") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as first,
            viewer.open_stream(agent.session_id) as second,
            trio.open_nursery() as nursery,
        ):
            sinks = [Sink(), Sink()]
            nursery.start_soon(sinks[0].run, first)
            nursery.start_soon(sinks[1].run, second)
            await wait_until(lambda: agent.statistics().viewers == 2)
            base = agent.statistics().records_logged
            for i in range(count):
                agent.log(Level.INFO, f"record {i}", logger="load", fields={"i": str(i)})
                if i % 100 == 0:
                    await trio.lowlevel.checkpoint()
            for sink in sinks:
                await sink.wait_count(count)
            nursery.cancel_scope.cancel()
        for sink in sinks:
            assert not [item for item in sink.items if isinstance(item, Gap)]
            assert sink.seqs() == list(range(base + 1, base + count + 1))
            assert [r.message for r in sink.items if isinstance(r, Record)][-1] == f"record {count - 1}"


async def test_history_then_live_without_gap_or_duplicate(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="hist") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            for i in range(50):
                agent.log(Level.INFO, f"old {i}")
            async with viewer.open_stream(agent.session_id, history=10) as stream:
                items = await collect(stream, 10)
                assert [r.seq for r in items if isinstance(r, Record)] == list(range(41, 51))
                agent.log(Level.INFO, "new")
                [item] = await collect(stream, 1)
                assert isinstance(item, Record) and (item.seq, item.message) == (51, "new")


async def test_late_viewer_joins_a_running_stream_without_disturbing_others(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="join") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as early,
            trio.open_nursery() as nursery,
        ):
            early_sink = Sink()
            nursery.start_soon(early_sink.run, early)
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(500):
                agent.log(Level.INFO, f"a{i}")
            await early_sink.wait_count(250)
            async with viewer.open_stream(agent.session_id, history=100_000) as late:
                late_sink = Sink()
                nursery.start_soon(late_sink.run, late)
                for i in range(500):
                    agent.log(Level.INFO, f"b{i}")
                    if i % 50 == 0:
                        await trio.lowlevel.checkpoint()
                await early_sink.wait_count(1000)
                await late_sink.wait_count(1000)
                nursery.cancel_scope.cancel()
        assert early_sink.seqs() == list(range(1, 1001))
        # The late viewer's history plus live stream covers everything once.
        assert late_sink.seqs() == list(range(1, 1001))
        assert not [i for i in early_sink.items + late_sink.items if isinstance(i, Gap)]


async def test_level_filter_per_viewer(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="levels") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id, min_level=Level.WARNING) as warnings,
            viewer.open_stream(agent.session_id) as everything,
            trio.open_nursery() as nursery,
        ):
            sinks = [Sink(), Sink()]
            nursery.start_soon(sinks[0].run, warnings)
            nursery.start_soon(sinks[1].run, everything)
            await wait_until(lambda: agent.statistics().viewers == 2)
            levels = [Level.DEBUG, Level.INFO, Level.WARNING, Level.ERROR, Level.CRITICAL] * 20
            for i, level in enumerate(levels):
                agent.log(level, f"m{i}")
            await sinks[1].wait_count(len(levels))
            await sinks[0].wait_count(60)
            nursery.cancel_scope.cancel()
        assert [r.level for r in sinks[0].items if isinstance(r, Record)] == [
            level for level in levels if level >= Level.WARNING
        ]
        assert len(sinks[1].seqs()) == len(levels)


async def test_agent_applies_the_lowest_level_any_viewer_asked_for(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="lvl") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id, min_level=Level.ERROR) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(200):
                agent.log(Level.DEBUG, f"noise {i}")
            agent.log(Level.ERROR, "boom")
            [item] = await collect(stream, 1)
            assert isinstance(item, Record) and item.message == "boom"
            # The DEBUG records were filtered at the agent, not sent.
            assert agent.statistics().records_sent == 1


async def test_second_session_is_unaffected(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="one") as one,
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="two") as two,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(one.session_id) as stream_one,
            viewer.open_stream(two.session_id) as stream_two,
        ):
            await wait_until(lambda: one.statistics().viewers == 1 and two.statistics().viewers == 1)
            one.log(Level.INFO, "from one")
            two.log(Level.INFO, "from two")
            [a] = await collect(stream_one, 1)
            [b] = await collect(stream_two, 1)
            assert isinstance(a, Record) and a.message == "from one"
            assert isinstance(b, Record) and b.message == "from two"
            assert two.statistics().records_sent == 1


async def test_leaving_open_agent_delivers_what_viewers_are_owed(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            trio.open_nursery() as nursery,
        ):
            sink = Sink()
            streams: list[loupelive.Stream] = []

            async def watch(session_id: str) -> None:
                async with viewer.open_stream(session_id) as stream:
                    streams.append(stream)
                    await sink.run(stream)

            async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="bye") as agent:
                nursery.start_soon(watch, agent.session_id)
                await wait_until(lambda: agent.statistics().viewers == 1)
                for i in range(5000):
                    agent.log(Level.INFO, f"last words {i}")
            # The block is left right after logging: everything still arrives.
            await sink.ended.wait()
        [stream] = streams
        assert sink.seqs() == list(range(1, 5001))
        assert stream.end_code is loupelive.ErrorCode.SESSION_ENDED


async def test_agent_connection_loss_ends_the_session_for_viewers(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer:
            events = viewer.session_events()
            with trio.CancelScope() as agent_scope:
                async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="doomed") as agent:
                    async with viewer.open_stream(agent.session_id) as stream:
                        await wait_until(lambda: agent.statistics().viewers == 1)
                        agent.log(Level.INFO, "before")
                        [item] = await collect(stream, 1)
                        assert isinstance(item, Record)
                        # Cut the agent's connections without a goodbye.
                        assert agent._control is not None
                        await trio.aclose_forcefully(agent._control.stream)
                        rest = await collect(stream, 1)
                        assert rest == []
                        assert stream.end_code is loupelive.ErrorCode.AGENT_LOST
                        agent_scope.cancel()
            async for event in events:
                if isinstance(event, loupelive.SessionEnded):
                    assert event.reason == "agent_lost"
                    break
            await events.aclose()


async def test_unknown_session_is_refused(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer:
            with pytest.raises(loupelive.HandshakeRejected) as exc_info:
                async with viewer.open_stream("no-such-session"):
                    raise AssertionError("opened a stream for a session that does not exist")
            assert exc_info.value.code is loupelive.ErrorCode.UNKNOWN_SESSION


async def test_tokens_are_checked_per_role(nursery: trio.Nursery) -> None:
    relay = await nursery.start(
        loupelive.serve_relay, test_config(agent_token="a-secret", viewer_token="v-secret")
    )
    with trio.fail_after(TEST_TIMEOUT):
        for token in (None, "wrong", "v-secret"):
            with pytest.raises(loupelive.AuthenticationError) as exc_info:
                async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="x", token=token):
                    raise AssertionError("agent accepted with a bad token")
            assert exc_info.value.code is loupelive.ErrorCode.BAD_TOKEN
        with pytest.raises(loupelive.AuthenticationError):
            async with loupelive.open_viewer("127.0.0.1", relay.viewer_port, token="a-secret"):
                raise AssertionError("viewer accepted with the agent token")
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="ok", token="a-secret") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port, token="v-secret") as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            agent.log(Level.INFO, "authorised")
            [item] = await collect(stream, 1)
            assert isinstance(item, Record) and item.message == "authorised"
        assert relay.statistics().rejected["bad_token"] == 4


async def test_statistics_count_traffic(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="stats") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(100):
                agent.log(Level.INFO, f"s{i}")
            await collect(stream, 100)
            stats = relay.statistics()
            assert stats.sessions == 1 and stats.viewer_streams == 1 and stats.agent_connections == 1
            assert stats.records_in >= 100 and stats.bytes_in > 0 and stats.bytes_out > 0
            assert stats.batches_dropped == 0 and stats.gaps_sent == 0


async def test_data_connection_loss_resumes_without_gap_or_duplicate(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="flaky") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
            trio.open_nursery() as nursery,
        ):
            sink = Sink()
            nursery.start_soon(sink.run, stream)
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(200):
                agent.log(Level.INFO, f"before {i}")
            await sink.wait_count(200)
            # Break the data connection under the agent's feet.
            first = agent._data_conn
            assert first is not None
            await trio.aclose_forcefully(first.stream)
            for i in range(200):
                agent.log(Level.INFO, f"during {i}")
            await wait_until(lambda: agent._data_conn is not first and agent.statistics().streaming)
            for i in range(200):
                agent.log(Level.INFO, f"after {i}")
            await sink.wait_count(600)
            nursery.cancel_scope.cancel()
        assert sink.seqs() == list(range(1, 601))
        assert not [item for item in sink.items if isinstance(item, Gap)]


async def test_statistics_over_the_wire_count_exactly(relay: loupelive.Relay) -> None:
    count = 500
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="counted") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(count):
                agent.log(Level.INFO, f"counted {i}")
            await collect(stream, count)
            stats = await viewer.statistics(detail=True)
            assert stats["records_in"] == count
            assert stats["sessions"] == 1
            assert stats["viewer_streams"] == 1
            assert stats["viewer_connections"] == 1
            assert stats["bytes_in"] > 0
            assert stats["raw_bytes_in"] > stats["bytes_in"]  # it was compressed
            assert stats["gaps_by_reason"] == {}
            assert stats["rss_bytes"] > 0
            [detail] = stats["session_details"]
            assert detail["session_id"] == agent.session_id
            assert detail["records_in"] == count
            assert stats["session_details_truncated"] is False
            # The same numbers as the in-process call.
            local = relay.statistics()
            assert local.records_in == stats["records_in"]
            assert local.bytes_in == stats["bytes_in"]

"""Sessions and streams that survive relay restarts and reconnects."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

import loupelive
from loupelive import ErrorCode, Gap, Level
from loupelive.messages import Accept, Close, Hello, Reject, Role
from loupelive.wire import FrameKind, encode_frame, encode_preamble

from .conftest import TEST_TIMEOUT, RawPeer, Sink, collect, open_raw, test_config, wait_until


class RestartableRelay:
    """A real relay in this Trio run that can be stopped and started on the same ports."""

    def __init__(self, nursery: trio.Nursery, **overrides: Any) -> None:
        self._nursery = nursery
        self._overrides = overrides
        self._scope: trio.CancelScope | None = None
        self.relay: loupelive.Relay | None = None
        self.agent_port = 0
        self.viewer_port = 0

    async def start(self) -> loupelive.Relay:
        config = test_config(agent_port=self.agent_port, viewer_port=self.viewer_port, **self._overrides)
        self._scope = trio.CancelScope()
        scope = self._scope

        async def run(task_status: trio.TaskStatus[loupelive.Relay]) -> None:
            with scope:
                await loupelive.serve_relay(config, task_status=task_status)

        self.relay = await self._nursery.start(run)
        self.agent_port, self.viewer_port = self.relay.agent_port, self.relay.viewer_port
        return self.relay

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


async def test_relay_restart_mid_stream_loses_and_duplicates_nothing(nursery: trio.Nursery) -> None:
    server = RestartableRelay(nursery, agent_grace=30.0)
    await server.start()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", server.agent_port, app="phoenix") as agent,
            loupelive.open_viewer("127.0.0.1", server.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
            trio.open_nursery() as inner,
        ):
            sink = Sink()
            inner.start_soon(sink.run, stream)
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(300):
                agent.log(Level.INFO, f"before {i}")
            await sink.wait_count(300)
            server.stop()
            await wait_until(lambda: not agent.connected.value)
            for i in range(300):
                agent.log(Level.INFO, f"while down {i}")
            await server.start()
            # Both sides come back by themselves; the viewer resumes after its last seq.
            await sink.wait_count(600)
            for i in range(300):
                agent.log(Level.INFO, f"after {i}")
            await sink.wait_count(900)
            inner.cancel_scope.cancel()
        assert sink.seqs() == list(range(1, 901))
        assert not [item for item in sink.items if isinstance(item, Gap)]
        assert stream.resumes >= 1
        assert viewer.connected.value


async def test_resume_beyond_the_ring_buffer_is_one_exact_gap(nursery: trio.Nursery) -> None:
    server = RestartableRelay(nursery, agent_grace=30.0)
    await server.start()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", server.agent_port, app="forgetful", buffer_records=50) as agent,
            loupelive.open_viewer("127.0.0.1", server.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
            trio.open_nursery() as inner,
        ):
            sink = Sink()
            inner.start_soon(sink.run, stream)
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(20):
                agent.log(Level.INFO, f"seen {i}")
            await sink.wait_count(20)
            server.stop()
            await wait_until(lambda: not agent.connected.value)
            # 200 records while the relay is down; the buffer keeps the last 50.
            for i in range(200):
                agent.log(Level.INFO, f"while down {i}")
            await server.start()
            await sink.wait_count(20 + 1 + 50)
            inner.cancel_scope.cancel()
        gaps = [item for item in sink.items if isinstance(item, Gap)]
        assert gaps == [Gap(21, 170, "history_unavailable")]
        assert sink.seqs() == list(range(1, 21)) + list(range(171, 221))


async def test_session_takeover_needs_the_session_secret(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="owned") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            info = agent.info
            session = relay.sessions[info.session_id]
            before = session.control
            # Someone else with the same session id: refused.
            intruder = await open_raw(relay.agent_port)
            answer = await intruder.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret="guess"))
            assert isinstance(answer, Reject)
            assert answer.code is ErrorCode.SESSION_CONFLICT
            no_secret = await open_raw(relay.agent_port)
            answer = await no_secret.handshake(Hello(role=Role.AGENT_CONTROL, session=info))
            assert isinstance(answer, Reject)
            assert answer.code is ErrorCode.SESSION_CONFLICT
            assert session.control is before
            # The owner (e.g. after a half-open connection): takes over.
            owner = await open_raw(relay.agent_port)
            answer = await owner.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret=agent._secret))
            assert isinstance(answer, Accept)
            assert relay.sessions[info.session_id] is session
            assert session.control is not before
            # The list still shows one session, running.
            await viewer.wait_sessions(lambda ss: len(ss) == 1 and ss[0].status == "running")
            for peer in (intruder, no_secret, owner):
                await peer.stream.aclose()


async def test_old_connection_gets_close_on_takeover(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        first = await open_raw(relay.agent_port)
        info = loupelive.SessionInfo(app="twice")
        assert isinstance(
            await first.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret="s3cret")), Accept
        )
        second = await open_raw(relay.agent_port)
        assert isinstance(
            await second.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret="s3cret")), Accept
        )
        close = await first.message()
        assert isinstance(close, Close)
        assert close.code is ErrorCode.SESSION_CONFLICT
        assert "replaced" in close.reason
        assert len(relay.sessions) == 1
        await first.stream.aclose()
        await second.stream.aclose()


async def test_disconnected_session_is_shown_then_ended_after_grace(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    relay = await nursery.start(loupelive.serve_relay, test_config(agent_grace=10.0))
    with trio.fail_after(TEST_TIMEOUT * 10):
        async with loupelive.open_viewer(connector=relay.memory_connector("viewer")) as viewer:
            events = viewer.session_events()
            peer = RawPeer(await relay.memory_connector("agent")("relay", 0))
            info = loupelive.SessionInfo(app="blip")
            assert isinstance(
                await peer.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret="x")), Accept
            )
            assert isinstance(await anext(events), loupelive.SessionAdded)
            await peer.stream.aclose()
            changed = await anext(events)
            assert isinstance(changed, loupelive.SessionChanged)
            assert changed.session.status == "disconnected"
            lost_at = trio.current_time()
            ended = await anext(events)
            assert isinstance(ended, loupelive.SessionEnded)
            assert ended.reason == "agent_lost"
            assert trio.current_time() - lost_at == pytest.approx(10.0, abs=0.5)
            await events.aclose()


async def test_history_request_is_served_after_reconnect(nursery: trio.Nursery) -> None:
    """A viewer joining while the agent is away waits, then gets its history."""
    server = RestartableRelay(nursery, agent_grace=30.0)
    await server.start()
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_agent("127.0.0.1", server.agent_port, app="late") as agent:
            for i in range(10):
                agent.log(Level.INFO, f"kept {i}")
            server.stop()
            await wait_until(lambda: not agent.connected.value)
            await server.start()
            await agent.connected.wait_value(True)
            async with (
                loupelive.open_viewer("127.0.0.1", server.viewer_port) as viewer,
                viewer.open_stream(agent.session_id, history=5) as stream,
            ):
                items = await collect(stream, 5)
                assert [r.seq for r in items if isinstance(r, loupelive.Record)] == [6, 7, 8, 9, 10]


async def test_simultaneous_takeovers_never_break_the_relay(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Several connections racing to take one session over (found by the fuzzer)."""
    relay = await nursery.start(loupelive.serve_relay, test_config(agent_grace=30.0))
    connect = relay.memory_connector("agent")
    info = loupelive.SessionInfo(app="contested")
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(50):
            peers: list[RawPeer] = []

            async def claim(peers: list[RawPeer] = peers) -> None:
                peer = RawPeer(await connect("relay", 0))
                peers.append(peer)
                # Losers of the race may be cut off before or after their ACCEPT.
                with contextlib.suppress(AssertionError, loupelive.RemoteProtocolError):
                    await peer.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret="same"))

            async with trio.open_nursery() as racers:
                for _ in range(3):
                    racers.start_soon(claim)
            await trio.testing.wait_all_tasks_blocked()
            for peer in peers:
                await peer.stream.aclose()
        # The last owner can still use the session.
        owner = RawPeer(await connect("relay", 0))
        answer = await owner.handshake(Hello(role=Role.AGENT_CONTROL, session=info, secret="same"))
        assert isinstance(answer, Accept)
        await owner.stream.aclose()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors == []


async def test_a_number_too_large_for_a_float_is_malformed_not_fatal(relay: loupelive.Relay) -> None:
    """One HELLO used to take the whole relay down (found by the fuzzer)."""
    payload = b'{"role":"agent_control","session":{"session_id":"x","started_at":1' + b"0" * 400 + b"}}"
    with trio.fail_after(TEST_TIMEOUT):
        peer = await open_raw(relay.agent_port)
        await peer.send(encode_preamble() + encode_frame(FrameKind.HELLO, payload))
        await peer.next_event()
        answer = await peer.message()
        assert isinstance(answer, Reject)
        assert answer.code is ErrorCode.MALFORMED
        await peer.stream.aclose()
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="still-here"):
            pass

"""The relay against bad input, over in-memory streams, peers driven by the real codec.

Each test hands one end of a ``trio.testing`` stream pair to the relay's
connection handler and plays the peer through :class:`RawPeer`.  After every
hostile peer the relay must still serve a well-behaved one.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable

import pytest
import trio
import trio.testing

import loupelive
from loupelive import ErrorCode, Level, Record
from loupelive.messages import (
    Accept,
    AddViewer,
    Close,
    GapNotice,
    Heartbeat,
    Hello,
    Reject,
    RequestSync,
    Role,
    SessionInfo,
    StartStream,
    StreamEnd,
    decode_message,
)
from loupelive.records import BatchDecoder, BatchEncoder
from loupelive.wire import HEADER, FrameKind, encode_frame, encode_preamble

from .conftest import TEST_TIMEOUT, RawPeer, test_config, wait_until

Handler = Callable[[trio.abc.Stream], object]


@pytest.fixture
async def mem_relay(nursery: trio.Nursery) -> tuple[loupelive.Relay, trio.Nursery]:
    relay = loupelive.Relay(test_config(heartbeat_interval=1.0, heartbeat_timeout=3.0, handshake_timeout=2.0))
    return relay, nursery


def connect(nursery: trio.Nursery, handler: Handler, *, lockstep: bool = False) -> RawPeer:
    """A raw peer whose other end is served by ``handler`` in ``nursery``."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client, server = pair()
    nursery.start_soon(handler, server)  # type: ignore[arg-type]
    return RawPeer(client)


async def register(relay: loupelive.Relay, nursery: trio.Nursery, app: str = "raw") -> tuple[RawPeer, str]:
    agent = connect(nursery, relay.handle_agent_connection)
    info = SessionInfo(app=app)
    answer = await agent.handshake(Hello(role=Role.AGENT_CONTROL, session=info))
    assert isinstance(answer, Accept)
    return agent, info.session_id


async def assert_still_serving(relay: loupelive.Relay, nursery: trio.Nursery) -> None:
    agent, session_id = await register(relay, nursery, app="well-behaved")
    assert session_id in relay.sessions
    await agent.stream.aclose()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00\x01garbage that is not loupelive", ErrorCode.BAD_MAGIC),
        (b"SSH-2.0-OpenSSH_9.6\r\n", ErrorCode.BAD_MAGIC),
        (encode_preamble(99) + b"", ErrorCode.UNSUPPORTED_VERSION),
    ],
)
async def test_wrong_protocol_gets_a_reject_and_a_close(
    mem_relay: tuple[loupelive.Relay, trio.Nursery], data: bytes, code: ErrorCode
) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        peer = connect(nursery, relay.handle_agent_connection)
        hello = Hello(role=Role.AGENT_CONTROL, session=SessionInfo(app="x"))
        from loupelive.messages import encode_message

        await peer.send(data + (encode_message(hello) if code is ErrorCode.UNSUPPORTED_VERSION else b""))
        reply = await peer.read_all()
        frames = reply[10:]
        length, kind = HEADER.unpack_from(frames)
        assert kind == FrameKind.REJECT
        assert json.loads(frames[HEADER.size : HEADER.size + length])["code"] == code.value
        assert relay.statistics().rejected[code.value] == 1
        await assert_still_serving(relay, nursery)


async def test_http_request_gets_a_plain_400(mem_relay: tuple[loupelive.Relay, trio.Nursery]) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        peer = connect(nursery, relay.handle_viewer_connection)
        await peer.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        reply = await peer.read_all()
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"loupelive relay port for viewers" in reply
        await assert_still_serving(relay, nursery)


async def test_tls_client_hello_on_plaintext_port_is_closed(
    mem_relay: tuple[loupelive.Relay, trio.Nursery],
) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        peer = connect(nursery, relay.handle_agent_connection)
        await peer.send(bytes.fromhex("16030100a5010000a10303") + bytes(32))
        assert await peer.read_all() == b""
        assert relay.statistics().rejected["tls_on_plaintext"] == 1


@pytest.mark.parametrize(
    ("handler_name", "hello", "code"),
    [
        ("handle_agent_connection", Hello(role=Role.VIEWER_CONTROL), ErrorCode.WRONG_ROLE),
        (
            "handle_viewer_connection",
            Hello(role=Role.AGENT_CONTROL, session=SessionInfo(app="x")),
            ErrorCode.WRONG_ROLE,
        ),
        ("handle_agent_connection", Hello(role=Role.AGENT_CONTROL), ErrorCode.MALFORMED),
        (
            "handle_viewer_connection",
            Hello(role=Role.VIEWER_DATA, session_id="nope"),
            ErrorCode.UNKNOWN_SESSION,
        ),
        (
            "handle_agent_connection",
            Hello(role=Role.AGENT_DATA, session_id="nope", stream=1),
            ErrorCode.UNKNOWN_SESSION,
        ),
    ],
)
async def test_bad_hello_is_rejected_with_its_code(
    mem_relay: tuple[loupelive.Relay, trio.Nursery], handler_name: str, hello: Hello, code: ErrorCode
) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        peer = connect(nursery, getattr(relay, handler_name))
        answer = await peer.handshake(hello)
        assert isinstance(answer, Reject)
        assert answer.code is code
        assert answer.reason
        assert await peer.read_all() == b""
        await assert_still_serving(relay, nursery)


async def test_first_frame_must_be_hello(mem_relay: tuple[loupelive.Relay, trio.Nursery]) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        peer = connect(nursery, relay.handle_viewer_connection)
        await peer.send(encode_preamble() + encode_frame(FrameKind.HELLO, b"{not json"))
        await peer.next_event()
        answer = await peer.message()
        assert isinstance(answer, Reject)
        assert answer.code is ErrorCode.MALFORMED


async def test_session_id_conflict_is_rejected(mem_relay: tuple[loupelive.Relay, trio.Nursery]) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        _agent, session_id = await register(relay, nursery)
        peer = connect(nursery, relay.handle_agent_connection)
        answer = await peer.handshake(
            Hello(role=Role.AGENT_CONTROL, session=SessionInfo(session_id=session_id))
        )
        assert isinstance(answer, Reject)
        assert answer.code is ErrorCode.SESSION_CONFLICT


async def test_oversized_frame_closes_with_frame_too_large(
    mem_relay: tuple[loupelive.Relay, trio.Nursery],
) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        agent, session_id = await register(relay, nursery)
        # Announce a 100 MiB frame: refused from the header alone.
        await agent.send(HEADER.pack(100 * 1024 * 1024, FrameKind.GOODBYE))
        close = await agent.message()
        assert isinstance(close, Close)
        assert close.code is ErrorCode.FRAME_TOO_LARGE
        assert await agent.read_all() == b""
        await wait_until(lambda: session_id not in relay.sessions)
        await assert_still_serving(relay, nursery)


async def test_unexpected_message_closes_with_its_code(
    mem_relay: tuple[loupelive.Relay, trio.Nursery],
) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        viewer = connect(nursery, relay.handle_viewer_connection)
        assert isinstance(await viewer.handshake(Hello(role=Role.VIEWER_CONTROL)), Accept)
        assert (await viewer.frame()).kind is FrameKind.SNAPSHOT_END
        await viewer.send_message(StartStream(stream=1))
        close = await viewer.message()
        assert isinstance(close, Close)
        assert close.code is ErrorCode.UNEXPECTED_MESSAGE


async def test_silent_peer_is_dropped_at_the_handshake_deadline(
    mem_relay: tuple[loupelive.Relay, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    relay, nursery = mem_relay
    peer = connect(nursery, relay.handle_agent_connection)
    with trio.fail_after(TEST_TIMEOUT):
        await peer.send(encode_preamble()[:4])  # half a preamble, then nothing
        assert await peer.read_all() == b""
        assert relay.statistics().rejected["timeout"] == 1


async def test_agent_that_stops_heartbeating_is_dropped(
    mem_relay: tuple[loupelive.Relay, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    relay, nursery = mem_relay
    with trio.fail_after(TEST_TIMEOUT):
        viewer = connect(nursery, relay.handle_viewer_connection)
        assert isinstance(await viewer.handshake(Hello(role=Role.VIEWER_CONTROL)), Accept)
        assert (await viewer.frame()).kind is FrameKind.SNAPSHOT_END

        async def keep_alive() -> None:
            # The viewer heartbeats (on the mock clock); the agent never does.
            while True:
                await viewer.send_message(Heartbeat())
                await trio.sleep(relay.config.heartbeat_interval)

        nursery.start_soon(keep_alive)
        _agent, session_id = await register(relay, nursery)
        start = trio.current_time()
        ended = None
        while ended is None:
            message = await viewer.message()
            if isinstance(message, loupelive.SessionEnded):
                ended = message
        assert ended.session_id == session_id
        assert ended.reason == "agent_lost"
        assert 3.0 <= trio.current_time() - start < 5.0


def _records(first: int, count: int, rng: random.Random, size: int = 400) -> list[Record]:
    return [
        Record(
            seq=seq,
            timestamp=1_700_000_000 + seq,
            level=Level.INFO,
            logger="raw",
            message="".join(rng.choices(string.ascii_letters, k=size)),
        )
        for seq in range(first, first + count)
    ]


async def _decode_all(peer: RawPeer, into: list[object], done: trio.Event | None = None) -> None:
    decoder = BatchDecoder()
    while True:
        frame = await peer.frame()
        if frame.kind is FrameKind.BATCH:
            header, records = decoder.decode(frame.payload)
            into.append(("batch", header.first_seq, header.last_seq, [r.seq for r in records]))
        else:
            message = decode_message(frame)
            into.append(message)
            if isinstance(message, StreamEnd):
                return


async def test_slow_viewer_skips_to_a_sync_point_with_an_exact_gap(nursery: trio.Nursery) -> None:
    """Flow control in the hub: the slow viewer loses a counted range, the other nothing."""
    budget = 20_000
    relay = loupelive.Relay(test_config(viewer_queue_bytes=budget))
    rng = random.Random(7)
    with trio.fail_after(TEST_TIMEOUT):
        agent, session_id = await register(relay, nursery)
        fast = connect(nursery, relay.handle_viewer_connection)
        slow = connect(nursery, relay.handle_viewer_connection, lockstep=True)
        for peer in (fast, slow):
            assert isinstance(
                await peer.handshake(Hello(role=Role.VIEWER_DATA, session_id=session_id)), Accept
            )
        commands = [await agent.message() for _ in range(3)]
        assert isinstance(commands[0], StartStream)
        viewers = [c.viewer for c in commands[1:] if isinstance(c, AddViewer)]
        assert len(viewers) == 2
        # A data connection with a forged stream key is refused …
        forged = connect(nursery, relay.handle_agent_connection)
        answer = await forged.handshake(
            Hello(role=Role.AGENT_DATA, session_id=session_id, stream=1, key="forged")
        )
        assert isinstance(answer, Reject)
        assert answer.code is ErrorCode.BAD_TOKEN
        # … the one with the key from START_STREAM is accepted.
        data = connect(nursery, relay.handle_agent_connection)
        answer = await data.handshake(
            Hello(role=Role.AGENT_DATA, session_id=session_id, stream=1, key=commands[0].key)
        )
        assert isinstance(answer, Accept)
        encoder = BatchEncoder()
        for viewer in viewers:  # empty histories, as a real agent sends
            payload = encoder.encode_history([], viewer=viewer, first_seq=1, last_seq=0, end=True)
            await data.send(encode_frame(FrameKind.BATCH, payload))
        fast_items: list[object] = []
        nursery.start_soon(_decode_all, fast, fast_items)
        seq = 1
        sync = True
        # Batches of ~4 KB of incompressible text until the slow viewer's queue
        # overflows and batches start being dropped for it.
        while relay.statistics().batches_dropped == 0:
            records = _records(seq, 10, rng)
            payload = encoder.encode(records, first_seq=seq, last_seq=seq + 9, sync=sync)
            await data.send(encode_frame(FrameKind.BATCH, payload))
            sync = False
            seq += 10
            await trio.testing.wait_all_tasks_blocked()
        first_dropped = seq - 10
        # The relay asked the agent for a sync point.
        assert isinstance(await agent.message(), RequestSync)
        # Two more dropped batches, then the slow viewer catches up.
        for _ in range(2):
            payload = encoder.encode(_records(seq, 10, rng), first_seq=seq, last_seq=seq + 9)
            await data.send(encode_frame(FrameKind.BATCH, payload))
            seq += 10
        slow_items: list[object] = []
        nursery.start_soon(_decode_all, slow, slow_items)
        await wait_until(lambda: relay.statistics().queued_bytes == 0)
        sync_first = seq
        payload = encoder.encode(_records(seq, 10, rng), first_seq=seq, last_seq=seq + 9, sync=True)
        await data.send(encode_frame(FrameKind.BATCH, payload))
        seq += 10
        await data.send_message(StreamEnd(code=ErrorCode.SESSION_ENDED, last_seq=seq - 1))
        await wait_until(lambda: bool(fast_items) and isinstance(fast_items[-1], StreamEnd))
        await wait_until(lambda: bool(slow_items) and isinstance(slow_items[-1], StreamEnd))

    def seqs(items: list[object]) -> list[int]:
        return [s for item in items if isinstance(item, tuple) for s in item[3]]

    assert seqs(fast_items) == list(range(1, seq))
    assert not [i for i in fast_items if isinstance(i, GapNotice)]
    gaps = [i for i in slow_items if isinstance(i, GapNotice)]
    assert gaps == [GapNotice(first_seq=first_dropped, last_seq=sync_first - 1, reason="viewer_slow")]
    assert seqs(slow_items) == list(range(1, first_dropped)) + list(range(sync_first, seq))
    stats = relay.statistics()
    assert stats.gaps_sent == 1
    assert stats.batches_dropped == (sync_first - first_dropped) // 10

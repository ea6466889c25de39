"""Shared fixtures: a real relay on loopback, and peers driven by the real codec."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

import loupelive
from loupelive.messages import Hello, Message, decode_message, encode_message
from loupelive.testing import TEST_DEFAULTS
from loupelive.wire import MAX_DATA_PAYLOAD, Frame, FrameDecoder, Preamble, encode_preamble

#: Generous bound for every I/O test: these machines are shared and noisy.
TEST_TIMEOUT = 30


def test_config(**overrides: Any) -> loupelive.RelayConfig:
    """A relay config for tests: the settings of ``loupelive.testing.open_relay``."""
    return loupelive.RelayConfig(**{**TEST_DEFAULTS, **overrides})


test_config.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
async def relay(nursery: trio.Nursery) -> loupelive.Relay:
    """A real relay on 127.0.0.1 with ephemeral ports, stopped at the end."""
    return await nursery.start(loupelive.serve_relay, test_config())  # type: ignore[no-any-return]


class RawPeer:
    """A peer that speaks the protocol through the real codec, frame by frame.

    Lets tests send exactly what they want (including garbage) and see exactly
    what the relay answers.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_payload=MAX_DATA_PAYLOAD)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def hello(self, hello: Hello) -> None:
        await self.send(encode_preamble() + encode_message(hello))

    async def send_message(self, message: Message) -> None:
        await self.send(encode_message(message))

    async def next_event(self) -> Preamble | Frame | None:
        """The next event, or None at a clean end of stream."""
        while True:
            event = self.decoder.next_event()
            if event is not None:
                return event
            if self.decoder.at_eof:
                return None
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.decoder.receive_data(data)

    async def frame(self) -> Frame:
        """The next frame other than a heartbeat."""
        while True:
            event = await self.next_event()
            assert isinstance(event, Frame), f"expected a frame, got {event!r}"
            if event.kind is not loupelive.wire.FrameKind.HEARTBEAT:
                return event

    async def message(self) -> Message:
        return decode_message(await self.frame())

    async def handshake(self, hello: Hello) -> Message:
        """Send preamble + HELLO; return the relay's ACCEPT or REJECT."""
        await self.hello(hello)
        event = await self.next_event()
        assert isinstance(event, Preamble)
        return await self.message()

    async def read_all(self) -> bytes:
        """Everything until the relay closes."""
        chunks = []
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


async def open_raw(port: int) -> RawPeer:
    return RawPeer(await trio.open_tcp_stream("127.0.0.1", port))


async def collect(stream: loupelive.Stream, count: int) -> list[loupelive.Record | loupelive.Gap]:
    """The next ``count`` items of a stream."""
    items: list[loupelive.Record | loupelive.Gap] = []
    async for item in stream:
        items.append(item)
        if len(items) >= count:
            break
    return items


async def wait_until(predicate: Any, *, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, checking whenever tasks are idle.

    For state with no event to wait on (statistics counters); the test's
    ``fail_after`` bounds it.
    """
    while not predicate():
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        await trio.lowlevel.checkpoint()


@attrs.define
class Sink:
    """Collects a stream's items in the background."""

    items: list[loupelive.Record | loupelive.Gap] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)
    ended: trio.Event = attrs.Factory(trio.Event)

    async def run(self, stream: loupelive.Stream) -> None:
        async for item in stream:
            self.items.append(item)
            self.changed.set()
            self.changed = trio.Event()
        self.ended.set()
        self.changed.set()

    async def wait_count(self, count: int) -> None:
        while len(self.items) < count and not self.ended.is_set():
            await self.changed.wait()

    def seqs(self) -> list[int]:
        return [item.seq for item in self.items if isinstance(item, loupelive.Record)]


@pytest.fixture
async def autoclose() -> AsyncIterator[list[trio.abc.AsyncResource]]:
    resources: list[trio.abc.AsyncResource] = []
    yield resources
    for resource in resources:
        await resource.aclose()

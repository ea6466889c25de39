"""The web viewer's HTTP and WebSocket endpoint, driven by a real WebSocket client.

Real loopback TCP: a relay from ``serve_relay``, the web viewer from
``serve_web``, and a ``wsproto`` client speaking the page's JSON protocol.
"""

from __future__ import annotations

import json
import re
from typing import Any

import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

import loupelive
from loupelive.web import MAX_CLIENT_MESSAGE, serve_web

from .conftest import TEST_TIMEOUT, test_config

TOKEN = "web-secret"


class WSClient:
    """A browser stand-in: one WebSocket to ``/ws``, JSON messages both ways."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.close: CloseConnection | None = None
        self.deflate = False

    @classmethod
    async def connect(cls, port: int, *, origin: str | None = None) -> WSClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"Origin", origin.encode())] if origin else []
        await stream.send_all(
            ws.send(
                Request(
                    host=f"127.0.0.1:{port}",
                    target="/ws",
                    extensions=[PerMessageDeflate()],
                    extra_headers=headers,
                )
            )
        )
        client = cls(stream, ws)
        while True:
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    client.deflate = any(isinstance(e, PerMessageDeflate) for e in event.extensions)
                    return client
                if isinstance(event, (RejectConnection, RejectData)):
                    await stream.aclose()
                    raise ConnectionRefusedError(getattr(event, "status_code", "rejected"))
            data = await stream.receive_some(65536)
            if not data:
                await stream.aclose()
                raise ConnectionRefusedError("closed during the handshake")
            ws.receive_data(data)

    async def send(self, obj: dict[str, Any] | str) -> None:
        text = obj if isinstance(obj, str) else json.dumps(obj)
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(BytesMessage(data=data)))

    async def next(self) -> dict[str, Any] | None:
        """The next JSON message, or None once the server closed."""
        parts: list[str] = []
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        obj: dict[str, Any] = json.loads("".join(parts))
                        self.messages.append(obj)
                        return obj
                elif isinstance(event, CloseConnection):
                    self.close = event
                    return None
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return None
            self.ws.receive_data(data)

    async def wait_for(self, kind: str, **fields: Any) -> dict[str, Any]:
        while True:
            message = await self.next()
            assert message is not None, f"closed ({self.close}) while waiting for {kind} {fields}"
            if message["type"] == kind and all(message.get(k) == v for k, v in fields.items()):
                return message

    async def until_closed(self) -> list[dict[str, Any]]:
        rest = []
        while (message := await self.next()) is not None:
            rest.append(message)
        await self.stream.aclose()
        return rest

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def web(nursery: trio.Nursery) -> tuple[loupelive.Relay, int]:
    relay: loupelive.Relay = await nursery.start(
        loupelive.serve_relay, test_config(viewer_token=TOKEN, handshake_timeout=2.0)
    )
    port: int = await nursery.start(serve_web, relay, "127.0.0.1", 0)
    return relay, port


async def logged_in(port: int) -> WSClient:
    client = await WSClient.connect(port)
    await client.send({"type": "auth", "token": TOKEN})
    assert (await client.next() or {}).get("type") == "welcome"
    return client


async def http_get(port: int, target: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method=method, target=target, headers=[("Host", f"127.0.0.1:{port}")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    await stream.aclose()
    return status, headers, body


# -- HTTP ------------------------------------------------------------------------------


async def test_page_is_served_with_strict_headers(web: tuple[loupelive.Relay, int]) -> None:
    _relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        status, headers, body = await http_get(port, "/")
        assert status == 200
        assert headers[b"content-type"].startswith(b"text/html")
        assert b"default-src 'self'" in headers[b"content-security-policy"]
        assert headers[b"x-frame-options"] == b"DENY"
        assert b"<html" in body.lower()
        # Nothing is loaded from elsewhere: no absolute http(s) URLs in the page.
        for name in ("/", "/app.js", "/style.css"):
            status, _, asset = await http_get(port, name)
            assert status == 200, name
            urls = re.findall(rb"https?://[^\s'\"]*", asset)
            # The SVG namespace is a name, not something fetched.
            assert set(urls) <= {b"http://www.w3.org/2000/svg"}, (name, urls)
        assert (await http_get(port, "/nope"))[0] == 404
        assert (await http_get(port, "/", method="POST"))[0] == 405
        assert (await http_get(port, "/ws"))[0] == 426


# -- authentication ----------------------------------------------------------------------


async def test_wrong_token_is_refused_and_the_relay_keeps_serving(web: tuple[loupelive.Relay, int]) -> None:
    relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await WSClient.connect(port)
        await client.send({"type": "auth", "token": "guess"})
        error = await client.next()
        assert error == {"type": "error", "code": "bad_token", "reason": "missing or wrong token"}
        assert await client.until_closed() == []
        assert client.close is not None and client.close.code == 1008
        assert relay.statistics().rejected.get("bad_token") == 1
        # Someone with the token is served as before.
        good = await logged_in(port)
        snapshot = await good.wait_for("snapshot")
        assert snapshot["sessions"] == []
        await good.aclose()


async def test_missing_token_and_commands_before_auth_are_refused(web: tuple[loupelive.Relay, int]) -> None:
    _relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await WSClient.connect(port)
        await client.send({"type": "auth"})
        assert (await client.next() or {}).get("code") == "bad_token"
        await client.until_closed()
        client = await WSClient.connect(port)
        await client.send({"type": "watch", "sub": 1, "session_id": "x"})
        assert (await client.next() or {}).get("code") == "unauthenticated"
        await client.until_closed()
        assert client.close is not None and client.close.code == 1008


async def test_silent_client_is_closed_after_the_handshake_timeout(
    web: tuple[loupelive.Relay, int], autojump_clock: trio.testing.MockClock
) -> None:
    _relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await WSClient.connect(port)
        assert (await client.next() or {}).get("code") == "timeout"
        await client.until_closed()


async def test_cross_origin_upgrade_is_refused(web: tuple[loupelive.Relay, int]) -> None:
    _relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(ConnectionRefusedError, match="403"):
            await WSClient.connect(port, origin="https://evil.example")
        same = await WSClient.connect(port, origin=f"http://127.0.0.1:{port}")
        await same.aclose()


# -- hostile messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code", "ws_code"),
    [
        pytest.param("{not json", "malformed", 1008, id="not-json"),
        pytest.param("[1, 2]", "malformed", 1008, id="not-an-object"),
        pytest.param(json.dumps({"type": "explode"}), "malformed", 1008, id="unknown-type"),
        pytest.param(
            json.dumps({"type": "watch", "sub": "x", "session_id": "a"}), "malformed", 1008, id="bad-sub"
        ),
        pytest.param(json.dumps({"type": "watch", "sub": 1}), "malformed", 1008, id="no-session"),
        pytest.param("x" * (MAX_CLIENT_MESSAGE + 1), "too_large", 1009, id="huge"),
    ],
)
async def test_bad_messages_close_cleanly(
    web: tuple[loupelive.Relay, int], payload: str, code: str, ws_code: int
) -> None:
    relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="bystander") as agent:
            watcher = await logged_in(port)
            await watcher.send(
                {"type": "watch", "sub": 1, "session_id": agent.session_id, "history": 0, "min_level": 0}
            )
            await watcher.wait_for("live", sub=1)
            client = await logged_in(port)
            await client.send(payload)
            error = await client.wait_for("error")
            assert error["code"] == code
            await client.until_closed()
            assert client.close is not None and client.close.code == ws_code
            # The other browser still gets its records.
            seq = agent.log(loupelive.Level.INFO, "still here")
            records = await watcher.wait_for("records", sub=1)
            assert [r["seq"] for r in records["records"]] == [seq]
            await watcher.aclose()


async def test_binary_messages_are_refused(web: tuple[loupelive.Relay, int]) -> None:
    _relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await logged_in(port)
        await client.send_bytes(b"\x00\x01")
        assert (await client.wait_for("error"))["code"] == "malformed"
        await client.until_closed()
        assert client.close is not None and client.close.code == 1002


# -- watching ------------------------------------------------------------------------------


async def test_session_list_records_levels_and_end(web: tuple[loupelive.Relay, int]) -> None:
    relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await logged_in(port)
        assert client.deflate, "permessage-deflate should be negotiated"
        await client.wait_for("snapshot")
        async with loupelive.open_agent(
            "127.0.0.1", relay.agent_port, app="shop", environment="staging"
        ) as agent:
            added = await client.wait_for("session")
            assert added["session"]["app"] == "shop"
            assert added["session"]["environment"] == "staging"
            history = [
                agent.log(level, f"before {i}", logger="shop.web")
                for i, level in enumerate(
                    [loupelive.Level.DEBUG, loupelive.Level.WARNING, loupelive.Level.ERROR] * 3
                )
            ]
            await client.send(
                {"type": "watch", "sub": 7, "session_id": agent.session_id, "history": 100, "min_level": 30}
            )
            watching = await client.wait_for("watching", sub=7)
            assert watching["session"]["session_id"] == agent.session_id
            seen: list[dict[str, Any]] = []
            while len(seen) < 6:
                message = await client.wait_for("records", sub=7)
                seen.extend(message["records"])
            # History at or above WARNING, in order, each exactly once.
            assert [r["seq"] for r in seen] == [s for i, s in enumerate(history) if i % 3 != 0]
            assert {r["level"] for r in seen} == {"WARNING", "ERROR"}
            live = agent.log(loupelive.Level.CRITICAL, "live one", exception="Traceback: boom")
            agent.log(loupelive.Level.INFO, "not for this tab")
            message = await client.wait_for("records", sub=7)
            (record,) = message["records"]
            assert (record["seq"], record["level"], record["exception"]) == (
                live,
                "CRITICAL",
                "Traceback: boom",
            )
            counts = await client.wait_for("counts")
            assert counts["counts"][0]["session_id"] == agent.session_id
        end = await client.wait_for("end", sub=7)
        assert end["code"] == "session_ended"
        ended = await client.wait_for("ended")
        assert (ended["session_id"], ended["status"]) == (agent.session_id, "ended")
        await client.aclose()


async def test_unknown_session_and_resume_after_seq(web: tuple[loupelive.Relay, int]) -> None:
    relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await logged_in(port)
        await client.send({"type": "watch", "sub": 1, "session_id": "no-such-session"})
        assert (await client.wait_for("end", sub=1))["code"] == "unknown_session"
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="resume") as agent:
            await client.wait_for("session")
            seqs = [agent.log(loupelive.Level.INFO, f"r{i}") for i in range(10)]
            await client.send({"type": "watch", "sub": 2, "session_id": agent.session_id, "history": 3})
            # The first browser of a session starts its tap (which asks the
            # agent for more history): it still gets exactly what it asked for.
            await client.wait_for("live", sub=2)
            got = [
                r["seq"]
                for m in client.messages
                if m["type"] == "records" and m["sub"] == 2
                for r in m["records"]
            ]
            assert got == seqs[-3:]
            # A second tab (sharing the same tap) resumes after seq 6: 7..10 exactly.
            await client.send(
                {
                    "type": "watch",
                    "sub": 3,
                    "session_id": agent.session_id,
                    "history": 0,
                    "after_seq": seqs[5],
                }
            )
            resumed: list[int] = []
            while len(resumed) < 4:
                resumed += [r["seq"] for r in (await client.wait_for("records", sub=3))["records"]]
            assert resumed == seqs[6:]
            assert len(relay.web.taps) == 1, "one tap per session, whatever the number of tabs"
        await client.aclose()


async def test_pause_and_resume_the_session_list(web: tuple[loupelive.Relay, int]) -> None:
    relay, port = web
    with trio.fail_after(TEST_TIMEOUT):
        client = await logged_in(port)
        await client.wait_for("snapshot")
        await client.send({"type": "pause_list"})
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="quiet") as agent:
            # The relay knows the session; a second browser sees it at once.
            other = await logged_in(port)
            snapshot = await other.wait_for("snapshot")
            assert [s["app"] for s in snapshot["sessions"]] == ["quiet"]
            # Let the session log and its counters change while paused; a
            # command's answer marks what had reached the paused browser by then.
            agent.log(loupelive.Level.ERROR, "while paused")
            await other.wait_for("counts")
            await client.send({"type": "watch", "sub": 99, "session_id": "barrier"})
            await client.wait_for("end", sub=99)
            assert [m["type"] for m in client.messages] == ["welcome", "snapshot", "end"]
            await client.send({"type": "resume_list"})
            fresh = await client.wait_for("snapshot")
            (info,) = fresh["sessions"]
            assert (info["session_id"], info["errors"]) == (agent.session_id, 1)
        await client.aclose()
        await other.aclose()

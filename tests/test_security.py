"""Security: hostile peers over real TCP beside a normal session, mutual TLS,
reloads, limits, and secure defaults."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

import loupelive
from loupelive import ErrorCode, Level, Record
from loupelive.messages import Accept, Close, Hello, Reject, Role, SessionInfo, encode_message
from loupelive.wire import HEADER, MAGIC, FrameKind, encode_frame, encode_preamble

from .conftest import TEST_TIMEOUT, RawPeer, Sink, open_raw, test_config, wait_until

# -- a table of hostile peers, each beside a well-behaved session ------------------------


async def _answer(peer: RawPeer) -> bytes:
    """Everything the relay says before closing."""
    return await peer.read_all()


def _frames(data: bytes) -> list[tuple[int, dict[str, object]]]:
    """Parse a relay reply (after its preamble) into (kind, JSON) pairs."""
    out = []
    data = data[10:]
    while len(data) >= HEADER.size:
        length, kind = HEADER.unpack_from(data)
        out.append((kind, json.loads(data[HEADER.size : HEADER.size + length] or b"{}")))
        data = data[HEADER.size + length :]
    return out


def _code_of(reply: bytes) -> str | None:
    if not reply.startswith(MAGIC):
        return None
    frames = _frames(reply)
    for kind, obj in frames:
        if kind in (FrameKind.REJECT, FrameKind.CLOSE):
            return str(obj["code"])
    return None


HostileAct = Callable[[loupelive.Relay, str], Awaitable[tuple[str | None, bytes]]]


async def _send_and_read(port: int, data: bytes) -> tuple[str | None, bytes]:
    peer = await open_raw(port)
    with trio.move_on_after(10):
        await peer.send(data)
    reply = await _answer(peer)
    await peer.stream.aclose()
    return _code_of(reply), reply


async def random_bytes(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    return await _send_and_read(relay.agent_port, bytes(range(7, 250, 3)) * 4)


async def valid_prefix_then_garbage(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    hello = Hello(role=Role.VIEWER_CONTROL)
    return await _send_and_read(
        relay.viewer_port, encode_preamble() + encode_message(hello)[:7] + b"\xff" * 64
    )


async def huge_frame_length(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    return await _send_and_read(relay.agent_port, encode_preamble() + HEADER.pack(2**32 - 1, FrameKind.HELLO))


async def frame_that_never_completes(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    # A slowloris: part of a HELLO, then nothing; the handshake deadline ends it.
    return await _send_and_read(
        relay.agent_port, encode_preamble() + HEADER.pack(100, FrameKind.HELLO) + b"{"
    )


async def wrong_magic(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    return await _send_and_read(relay.viewer_port, b"\x8bLOUPX\r\n\x00\x01")


async def wrong_version(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    return await _send_and_read(
        relay.viewer_port, MAGIC + (99).to_bytes(2, "big") + encode_message(Hello(role=Role.VIEWER_CONTROL))
    )


async def wrong_role(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    return await _send_and_read(
        relay.viewer_port,
        encode_preamble() + encode_message(Hello(role=Role.AGENT_CONTROL, session=SessionInfo())),
    )


async def http_request(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    code, reply = await _send_and_read(relay.agent_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return ("http_400" if reply.startswith(b"HTTP/1.1 400") else code), reply


async def tls_client_hello(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    code, reply = await _send_and_read(relay.agent_port, bytes.fromhex("16030100a5010000a10303") + bytes(64))
    return ("closed" if reply == b"" else code), reply


async def forged_stream_key(relay: loupelive.Relay, session_id: str) -> tuple[str | None, bytes]:
    hello = Hello(role=Role.AGENT_DATA, session_id=session_id, stream=1, key="forged")
    return await _send_and_read(relay.agent_port, encode_preamble() + encode_message(hello))


async def ten_thousand_tags(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    session = {"session_id": "tags", "tags": {f"k{i}": "v" for i in range(10_000)}}
    payload = json.dumps({"role": "agent_control", "session": session}).encode()
    return await _send_and_read(relay.agent_port, encode_preamble() + encode_frame(FrameKind.HELLO, payload))


async def nonexistent_session(relay: loupelive.Relay, _: str) -> tuple[str | None, bytes]:
    hello = Hello(role=Role.VIEWER_DATA, session_id="no-such-session")
    return await _send_and_read(relay.viewer_port, encode_preamble() + encode_message(hello))


HOSTILE: list[tuple[HostileAct, str]] = [
    (random_bytes, "bad_magic"),
    (valid_prefix_then_garbage, "malformed"),
    (huge_frame_length, "frame_too_large"),
    (frame_that_never_completes, "closed-by-deadline"),
    (wrong_magic, "bad_magic"),
    (wrong_version, "unsupported_version"),
    (wrong_role, "wrong_role"),
    (http_request, "http_400"),
    (tls_client_hello, "closed"),
    (forged_stream_key, "bad_token"),
    (ten_thousand_tags, "malformed"),
    (nonexistent_session, "unknown_session"),
]


async def test_hostile_peers_beside_a_normal_session(nursery: trio.Nursery) -> None:
    relay = await nursery.start(loupelive.serve_relay, test_config(handshake_timeout=1.0))
    count = 2000
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="innocent") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
            trio.open_nursery() as inner,
        ):
            sink = Sink()
            inner.start_soon(sink.run, stream)
            await wait_until(lambda: agent.statistics().viewers == 1)
            results: dict[str, str | None] = {}

            async def attack(act: HostileAct) -> None:
                code, _reply = await act(relay, agent.session_id)
                results[act.__name__] = code

            async def log_steadily() -> None:
                for i in range(count):
                    agent.log(Level.INFO, f"steady {i}")
                    if i % 50 == 0:
                        await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as attackers:
                attackers.start_soon(log_steadily)
                for act, _expected in HOSTILE:
                    attackers.start_soon(attack, act)
            await sink.wait_count(count)
            inner.cancel_scope.cancel()
        expected = {act.__name__: code for act, code in HOSTILE}
        expected["frame_that_never_completes"] = None  # closed silently at the deadline
        assert results == expected
        # The well-behaved session saw nothing of it.
        assert sink.seqs() == list(range(1, count + 1))
        assert all(isinstance(item, Record) for item in sink.items)
        stats = relay.statistics()
        assert stats.rejected["timeout"] == 1
        await wait_until(lambda: relay.statistics().viewer_connections == 0)


# -- mutual TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _write_server_files(ca: trustme.CA, directory: Path) -> tuple[str, str, str]:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = directory / "relay.pem", directory / "relay.key", directory / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert_file), str(key_file), str(ca_file)


async def test_mutual_tls_requires_a_client_certificate(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> None:
    cert_file, key_file, ca_file = _write_server_files(ca, tmp_path)
    config = test_config(
        tls_cert=cert_file, tls_key=key_file, tls_client_ca=ca_file, tls_client_ca_ports="agent"
    )
    relay = await nursery.start(loupelive.serve_relay, config)
    plain = ssl.create_default_context(cafile=ca_file)
    with_cert = ssl.create_default_context(cafile=ca_file)
    ca.issue_cert("agent@billing").configure_cert(with_cert)
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(loupelive.ConnectionClosed):
            async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="nocert", tls=plain):
                raise AssertionError("an agent without a client certificate got in")
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="mtls", tls=with_cert) as agent,
            # Only the agent port requires client certificates here.
            loupelive.open_viewer("127.0.0.1", relay.viewer_port, tls=plain) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            agent.log(Level.INFO, "mutual")
            item = await anext(stream)
            assert isinstance(item, Record)
            assert item.message == "mutual"


# -- reload ---------------------------------------------------------------------------------


async def test_reload_reads_new_tokens_and_certificates(nursery: trio.Nursery, tmp_path: Path) -> None:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    cert_file, key_file, first_ca_file = _write_server_files(first_ca, tmp_path)
    token_file = tmp_path / "agent.token"
    token_file.write_text("old-token\n")
    config = test_config(
        tls_cert=cert_file, tls_key=key_file, agent_token_file=str(token_file), viewer_token="v"
    )
    relay = await nursery.start(loupelive.serve_relay, config)
    with trio.fail_after(TEST_TIMEOUT):
        first_trust = ssl.create_default_context(cafile=first_ca_file)
        async with loupelive.open_agent(
            "127.0.0.1", relay.agent_port, app="a", token="old-token", tls=first_trust
        ):
            pass
        # Replace both files, then reload (serve does this on SIGHUP).
        token_file.write_text("new-token\n")
        (tmp_path / "second").mkdir()
        new_cert, new_key, second_ca_file = _write_server_files(second_ca, tmp_path / "second")
        os.replace(new_cert, cert_file)
        os.replace(new_key, key_file)
        relay.reload()
        second_trust = ssl.create_default_context(cafile=second_ca_file)
        with pytest.raises(loupelive.AuthenticationError):
            async with loupelive.open_agent(
                "127.0.0.1", relay.agent_port, app="a", token="old-token", tls=second_trust
            ):
                raise AssertionError("the old token still works")
        with pytest.raises(loupelive.ConnectionClosed):
            async with loupelive.open_agent(
                "127.0.0.1", relay.agent_port, app="a", token="new-token", tls=first_trust
            ):
                raise AssertionError("the old certificate is still served")
        async with loupelive.open_agent(
            "127.0.0.1", relay.agent_port, app="a", token="new-token", tls=second_trust
        ):
            pass


# -- limits and slowdowns ----------------------------------------------------------------------


async def test_connections_per_address_are_limited(nursery: trio.Nursery) -> None:
    relay = await nursery.start(loupelive.serve_relay, test_config(max_connections_per_address=2))
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port),
            loupelive.open_viewer("127.0.0.1", relay.viewer_port),
        ):
            with pytest.raises(loupelive.HandshakeRejected) as exc_info:
                async with loupelive.open_viewer("127.0.0.1", relay.viewer_port):
                    raise AssertionError("a third connection from one address got in")
            assert exc_info.value.code is ErrorCode.LIMIT_REACHED
        # Closed connections free their slots.
        await wait_until(lambda: relay.statistics().viewer_connections == 0)
        async with loupelive.open_viewer("127.0.0.1", relay.viewer_port):
            pass


async def test_repeated_bad_tokens_are_slowed_down(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    relay = await nursery.start(loupelive.serve_relay, test_config(viewer_token="right"))
    connect = relay.memory_connector("viewer")
    delays = []
    with trio.fail_after(600):
        for _ in range(8):
            peer = RawPeer(await connect("relay", 0))
            start = trio.current_time()
            answer = await peer.handshake(Hello(role=Role.VIEWER_CONTROL, token="guess"))
            delays.append(trio.current_time() - start)
            assert isinstance(answer, Reject)
            assert answer.code is ErrorCode.BAD_TOKEN
            await peer.stream.aclose()
    assert delays[:5] == [0, 0, 0, 0, 0]
    assert 0 < delays[5] < delays[6] < delays[7] <= 5.0


# -- secure defaults ---------------------------------------------------------------------------


def test_public_address_without_tls_and_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="insecure") as exc_info:
        loupelive.RelayConfig(host="0.0.0.0")
    assert "TLS" in str(exc_info.value)
    assert "token" in str(exc_info.value)
    assert loupelive.RelayConfig(host="0.0.0.0", insecure=True).insecure
    loupelive.RelayConfig(
        host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem", agent_token="a", viewer_token="v"
    )
    loupelive.RelayConfig(host="::1")
    loupelive.RelayConfig(host="localhost")


def test_secrets_do_not_appear_in_reprs() -> None:
    hello = Hello(role=Role.AGENT_CONTROL, token="t0ken", secret="s3cret", key="k3y")
    assert "t0ken" not in repr(hello)
    assert "s3cret" not in repr(hello)
    assert "k3y" not in repr(hello)
    assert "t0ken" not in repr(loupelive.RelayConfig(agent_token="t0ken"))


async def test_unexpected_message_after_handshake_gets_close(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        peer = await open_raw(relay.viewer_port)
        assert isinstance(await peer.handshake(Hello(role=Role.VIEWER_CONTROL)), Accept)
        assert (await peer.frame()).kind is FrameKind.SNAPSHOT_END
        await peer.send(encode_message(Hello(role=Role.VIEWER_CONTROL)))
        close = await peer.message()
        assert isinstance(close, Close)
        assert close.code is ErrorCode.UNEXPECTED_MESSAGE
        await peer.stream.aclose()

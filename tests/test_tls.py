"""Real TLS on both ports, with trustme certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme

import loupelive
from loupelive import Level, Record

from .conftest import TEST_TIMEOUT, collect, test_config, wait_until


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_relay(nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> loupelive.Relay:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file = tmp_path / "relay.pem"
    key_file = tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    config = test_config(tls_cert=str(cert_file), tls_key=str(key_file))
    return await nursery.start(loupelive.serve_relay, config)  # type: ignore[no-any-return]


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_agent_and_viewer_over_tls(tls_relay: loupelive.Relay, client_context: ssl.SSLContext) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent(
                "127.0.0.1", tls_relay.agent_port, app="secure", tls=client_context
            ) as agent,
            loupelive.open_viewer("127.0.0.1", tls_relay.viewer_port, tls=client_context) as viewer,
            viewer.open_stream(agent.session_id, history=5) as stream,
        ):
            assert [s.app for s in viewer.sessions()] == ["secure"]
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(300):
                agent.log(Level.WARNING, f"encrypted {i}", fields={"n": str(i)})
            items = await collect(stream, 300)
            assert [r.message for r in items if isinstance(r, Record)] == [
                f"encrypted {i}" for i in range(300)
            ]


async def test_untrusted_certificate_is_a_clear_error(tls_relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(loupelive.ConnectionClosed) as exc_info:
        async with loupelive.open_viewer("127.0.0.1", tls_relay.viewer_port, tls=True):
            raise AssertionError("connected without trusting the certificate")
    assert "certificate verify failed" in exc_info.value.reason


async def test_wrong_hostname_is_refused(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path, client_context: ssl.SSLContext
) -> None:
    cert = ca.issue_cert("relay.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    relay = await nursery.start(
        loupelive.serve_relay, test_config(tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem"))
    )
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(loupelive.ConnectionClosed) as exc_info:
        async with loupelive.open_viewer("127.0.0.1", relay.viewer_port, tls=client_context):
            raise AssertionError("connected to a relay with the wrong name")
    assert "127.0.0.1" in exc_info.value.reason


async def test_plaintext_client_against_tls_relay(tls_relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(loupelive.ConnectionClosed) as exc_info:
        async with loupelive.open_viewer("127.0.0.1", tls_relay.viewer_port):
            raise AssertionError("plaintext client got through to a TLS port")
    assert "TLS" in exc_info.value.reason
    # The relay is unharmed.
    assert tls_relay.statistics().viewer_connections == 0


async def test_tls_client_against_plaintext_relay(
    relay: loupelive.Relay, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(loupelive.ConnectionClosed) as exc_info:
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="x", tls=client_context):
            raise AssertionError("TLS client got through to a plaintext port")
    assert "TLS" in exc_info.value.reason
    await wait_until(lambda: relay.statistics().rejected.get("tls_on_plaintext") == 1)

"""Prometheus metrics and health over HTTP, scraped by a real HTTP client."""

from __future__ import annotations

from pathlib import Path

import h11
import trio
from prometheus_client.parser import text_string_to_metric_families

import loupelive
from loupelive import Level
from loupelive.metrics import serve_metrics

from .cli_helpers import start_relay
from .conftest import TEST_TIMEOUT, collect, wait_until


async def http_get(port: int, target: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """A real HTTP/1.1 GET over TCP (h11 as the client)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target, headers=[("host", "relay"), ("connection", "close")])
    await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    await stream.aclose()
    return status, headers, body


async def test_metrics_reflect_the_relay(relay: loupelive.Relay, nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_metrics, relay, "127.0.0.1", 0)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="scraped") as agent,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            viewer.open_stream(agent.session_id) as stream,
        ):
            await wait_until(lambda: agent.statistics().viewers == 1)
            for i in range(250):
                agent.log(Level.INFO, f"m{i}")
            await collect(stream, 250)
            status, headers, body = await http_get(port, "/metrics")
            assert status == 200
            assert headers[b"content-type"].startswith(b"text/plain")
            families = {family.name: family for family in text_string_to_metric_families(body.decode())}
            sample = {s.name: s.value for family in families.values() for s in family.samples}
            assert sample["loupelive_relay_sessions"] == 1
            assert sample["loupelive_relay_viewer_streams"] == 1
            assert sample["loupelive_relay_records_in_total"] == 250
            assert families["loupelive_relay_batch_records"].type == "histogram"
            assert sample["loupelive_relay_batch_records_count"] == relay.statistics().batches_in
            assert sample["loupelive_relay_batch_records_sum"] == 250
            # No per-session series unless asked for.
            assert not [name for name in sample if "session_records" in name]


async def test_healthz_and_unknown_paths(relay: loupelive.Relay, nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_metrics, relay, "127.0.0.1", 0)
    with trio.fail_after(TEST_TIMEOUT):
        status, _, body = await http_get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        status, _, _ = await http_get(port, "/nope")
        assert status == 404
        await relay.shutdown(grace=0)
        status, _, body = await http_get(port, "/healthz")
        assert (status, body) == (503, b"shutting down\n")


async def test_per_session_series_are_opt_in(relay: loupelive.Relay, nursery: trio.Nursery) -> None:
    from functools import partial

    port = await nursery.start(partial(serve_metrics, per_session=True), relay, "127.0.0.1", 0)
    with trio.fail_after(TEST_TIMEOUT):
        async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="labelled") as agent:
            _, _, body = await http_get(port, "/metrics")
            samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]
            labelled = [s for s in samples if s.name.startswith("loupelive_relay_session_records_in")]
            assert [s.labels for s in labelled] == [{"session_id": agent.session_id, "app": "labelled"}]


async def test_serve_metrics_flag(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path, "--metrics", "127.0.0.1:0") as relay:
            port = relay.ready["metrics_port"]
            status, _, body = await http_get(port, "/healthz")
            assert (status, body) == (200, b"ok\n")
            status, _, body = await http_get(port, "/metrics")
            assert status == 200
            assert b"loupelive_relay_sessions 0.0" in body

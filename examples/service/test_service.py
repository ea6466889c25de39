"""Testing a multi-process service by waiting for its log lines.

The service (``service.py``) runs as a real subprocess.  The ``loupe_relay``
fixture (from loupelive's pytest plugin) runs a relay inside this test's Trio
run; ``loupe_relay.env()`` points the service's ``LiveHandler.from_env`` at it,
and ``loupe_capture`` collects everything the service logs.  So the test waits
for "listening on port N" instead of sleeping or polling, learns the port from
that record, and checks that nothing was logged at ERROR.  If the test fails,
pytest's report shows every captured record.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import trio

import loupelive
from loupelive.testing import Capture, TestRelay

SERVICE = Path(__file__).with_name("service.py")

#: Generous: CI machines are slow and shared.
TIMEOUT = 30

LISTENING = re.compile(r"^listening on port (\d+)$")


async def receive_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        assert chunk, f"the service closed the connection after {data!r}"
        data += chunk
    return data


async def test_the_service_answers_and_logs_each_request(
    loupe_relay: TestRelay, loupe_capture: Capture
) -> None:
    env = {**os.environ, **loupe_relay.env()}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            # Cancelling the nursery (if the test fails) terminates the service.
            process: trio.Process = await nursery.start(
                functools.partial(trio.run_process, [sys.executable, str(SERVICE)], env=env, check=False)
            )

            listening = await loupe_capture.wait_for(LISTENING, app="echo-service")
            match = LISTENING.search(listening.message)
            assert match is not None
            port = int(match[1])

            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"hello, loupe\n")
                assert await receive_line(stream) == b"HELLO, LOUPE\n"
                await stream.send_all(b"second request\n")
                assert await receive_line(stream) == b"SECOND REQUEST\n"

            second = await loupe_capture.wait_for("SECOND REQUEST")
            assert second.message.startswith("request 2 from 127.0.0.1:")
            first = await loupe_capture.wait_for(re.compile(r"^request 1 from .*: HELLO, LOUPE$"))
            assert first.level == loupelive.Level.INFO
            assert first.fields["peer"].startswith("127.0.0.1:")

            loupe_capture.assert_no(level=loupelive.Level.ERROR)

            process.terminate()
        assert process.returncode == 0

        # Logged on the way out, delivered as the service's handler closed.
        await loupe_capture.wait_for("stopped")
    loupe_capture.assert_no(level=loupelive.Level.WARNING)
    assert [record.message for record in loupe_capture.records][-2:] == ["stopping on SIGTERM", "stopped"]

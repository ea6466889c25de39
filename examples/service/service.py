"""A small service under test: uppercases lines over TCP, logs through loupelive.

It binds 127.0.0.1 on an ephemeral port and logs which one ("listening on port
N"), one line per request, and "stopped" when SIGTERM ends it.  Its logging goes
to the relay named by ``LOUPELIVE_RELAY`` (``LiveHandler.from_env``), so a test
can wait for these lines instead of sleeping or parsing stdout.

Run by hand (with a relay on the default port, watched by ``loupelive tail
echo-service``)::

    python examples/service/service.py
    printf 'hello\\n' | nc 127.0.0.1 PORT
"""

from __future__ import annotations

import itertools
import logging
import signal

import trio

import loupelive

log = logging.getLogger("echo_service")

_requests = itertools.count(1)


async def handle(stream: trio.SocketStream) -> None:
    """Answer every line with the same line in upper case, until the client closes."""
    host, port = stream.socket.getpeername()[:2]
    peer = f"{host}:{port}"
    pending = b""
    async with stream:
        try:
            async for data in stream:
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    reply = line.decode("utf-8", "replace").upper()
                    await stream.send_all(reply.encode("utf-8") + b"\n")
                    log.info("request %d from %s: %s", next(_requests), peer, reply, extra={"peer": peer})
        except trio.BrokenResourceError:
            log.warning("client %s went away", peer)


async def main() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            log.info("listening on port %d", port, extra={"port": port})
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("stopped")


if __name__ == "__main__":
    # The one line that connects a program to loupelive; close() at exit (by
    # logging.shutdown) delivers what viewers are still owed.
    logging.getLogger().addHandler(loupelive.LiveHandler.from_env(app="echo-service"))
    logging.getLogger().setLevel(logging.INFO)
    trio.run(main)

"""``LiveHandler``: a program's ``logging`` records, live, through a real relay.

Programs under test are real: either a Python subprocess that uses nothing but
``logging`` and ``loupelive.LiveHandler`` (started with ``-u`` from a script
written to ``tmp_path``), or handlers in this process, logging from plain
threads.  The relay (the ``relay`` fixture) runs in this process on loopback
TCP; viewers are ``open_viewer`` + ``open_stream``.

Nothing waits on time: the tests wait on the children's output, on the
viewer's session list and streams, or on a condition (``wait_until``), always
under ``trio.fail_after``.  ``close()`` blocks (it joins the handler's thread),
so in-process handlers are always closed from a worker thread: the relay they
talk to runs on this test's own Trio loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import loupelive
from loupelive import ErrorCode, Gap, LiveHandler, Record

from .cli_helpers import Child, assert_no_traceback, child_env, run_child
from .conftest import TEST_TIMEOUT, Sink, collect, test_config, wait_until

#: ``close()`` of a handler whose relay is gone must return within its
#: ``close_timeout`` plus the one second it allows for joining its thread.
CLOSE_JOIN_MARGIN = 1.0


# -- helpers -------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def close_handler(handler: logging.Handler) -> float:
    """``handler.close()`` in a worker thread (it blocks); returns how long it took."""

    def timed_close() -> float:
        started = time.monotonic()
        handler.close()
        return time.monotonic() - started

    return await trio.to_thread.run_sync(timed_close)


@contextlib.asynccontextmanager
async def live_handler(
    relay: str, *, app: str, logger: logging.Logger | None = None, **kwargs: Any
) -> AsyncIterator[tuple[LiveHandler, logging.Logger]]:
    """A LiveHandler on a logger of its own (DEBUG, not propagated), closed at the end.

    Made in a worker thread (the constructor waits for its agent thread to
    start), and closed in one whatever happened, so its thread never outlives
    the test.
    """
    handler = await trio.to_thread.run_sync(functools.partial(LiveHandler, relay, app=app, **kwargs))
    if logger is None:
        logger = logging.getLogger(unique("handler_test"))
        logger.setLevel(logging.DEBUG)
        # Not into pytest's capture: some tests log tens of thousands of records.
        logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler, logger
    finally:
        logger.removeHandler(handler)
        with trio.CancelScope(shield=True), trio.move_on_after(TEST_TIMEOUT):
            await close_handler(handler)


async def wait_streaming(handler: LiveHandler, viewers: int = 1) -> None:
    """Wait until the handler's agent streams to ``viewers`` viewers (they are live)."""

    def live() -> bool:
        stats = handler.statistics()
        return stats.streaming and stats.viewers == viewers

    await wait_until(live)


def records_of(items: list[Record | Gap]) -> list[Record]:
    gaps = [item for item in items if isinstance(item, Gap)]
    assert not gaps, f"unexpected gaps: {gaps}"
    return [item for item in items if isinstance(item, Record)]


async def drain(stream: loupelive.Stream) -> list[Record | Gap]:
    """Everything left in ``stream`` until it ends."""
    return [item async for item in stream]


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextlib.asynccontextmanager
async def run_python(script: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[Child]:
    """Run ``python -u SCRIPT ARGS`` with pipes on all three streams (see ``run_child``)."""
    async with run_child([sys.executable, "-u", str(script), *args], stdin=True, env=env) as child:
        yield child


class AgentProxy:
    """A TCP forwarder in front of the relay's agent port.

    The first connection (the agent's control connection) is forwarded at
    once.  With ``hold_data``, every later one (its data connections) waits
    for ``release``, so a test can catch the agent between "a viewer asked for
    a stream" and "the stream is up"; after :meth:`release_on_control_bytes`,
    the next bytes the agent sends on its control connection (a GOODBYE, or a
    heartbeat) set ``release`` before they are forwarded.  :meth:`cut` drops
    every connection (as a network failure would).
    """

    def __init__(self, target_port: int, *, hold_data: bool = False) -> None:
        self.target_port = target_port
        self.connections = 0
        self.held = trio.Event()
        self.release = trio.Event()
        if not hold_data:
            self.release.set()
        self._armed = False
        self._scopes: list[trio.CancelScope] = []

    def release_on_control_bytes(self) -> None:
        self._armed = True

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def serve(self, nursery: trio.Nursery) -> int:
        """Start serving in ``nursery``; return the proxy's port."""
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        port: int = listeners[0].socket.getsockname()[1]
        return port

    async def handle(self, client: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        if index > 0 and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        async with client:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                self._scopes.append(nursery.cancel_scope)
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope, index == 0)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope, False)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope, control_out: bool
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if control_out and self._armed:
                    self.release.set()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    return write


# -- 1. a real synchronous program ---------------------------------------------------------

SYNC_PROGRAM = """
    import logging
    import sys
    import threading

    import loupelive

    relay, app = sys.argv[1], sys.argv[2]
    logging.getLogger().addHandler(loupelive.LiveHandler(relay, app=app))
    log = logging.getLogger("shop.orders")
    log.setLevel(logging.DEBUG)
    print("session", logging.getLogger().handlers[0].session_id, flush=True)

    log.debug("order %s has %d items costing %.2f", "A-17", 3, 9.5)
    try:
        {}["missing"]
    except KeyError:
        log.exception("lookup of %r failed", "missing")


    def work():
        log.warning("from the %s thread", "worker")


    worker = threading.Thread(target=work, name="worker-7")
    worker.start()
    worker.join()
    log.info("with extras", extra={"user_id": 42, "tags": ["a", "b"]})
    print("logged", flush=True)

    sys.stdin.readline()
    # Logged just before the interpreter exits: only close() (logging.shutdown
    # at exit) can deliver it.
    log.error("last words %s", "before exit")
"""


async def test_a_synchronous_program_is_watched_live(
    relay: loupelive.Relay, write_script: Callable[[str, str], Path]
) -> None:
    script = write_script("sync_program.py", SYNC_PROGRAM)
    app = unique("sync-program")
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            run_python(script, f"127.0.0.1:{relay.agent_port}", app) as child,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            session_id = (await child.stdout.wait_for_line(r"^session (\S+)$"))[1]
            info = await viewer.wait_for_session(session_id)
            assert (info.app, info.pid) == (app, child.pid)
            await child.stdout.wait_for_line(r"^logged$")
            async with viewer.open_stream(session_id, history=1000) as stream:
                first = records_of(await collect(stream, 4))
                await child.write("exit now\n")
                rest = records_of(await drain(stream))
                assert stream.end_code is ErrorCode.SESSION_ENDED, (stream.end_code, stream.end_reason)
            code = await child.wait()
        assert code == 0, child.describe()
        assert_no_traceback(child.stderr.text)

    records = first + rest
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert [(r.level, r.logger, r.thread, r.message) for r in records] == [
        (loupelive.Level.DEBUG, "shop.orders", "MainThread", "order A-17 has 3 items costing 9.50"),
        (loupelive.Level.ERROR, "shop.orders", "MainThread", "lookup of 'missing' failed"),
        (loupelive.Level.WARNING, "shop.orders", "worker-7", "from the worker thread"),
        (loupelive.Level.INFO, "shop.orders", "MainThread", "with extras"),
        (loupelive.Level.ERROR, "shop.orders", "MainThread", "last words before exit"),
    ]
    exception = records[1].exception
    assert exception is not None
    assert exception.startswith("Traceback (most recent call last):\n"), exception
    assert 'File "' in exception and '{}["missing"]' in exception, exception
    assert exception.rstrip().endswith("KeyError: 'missing'"), exception
    assert [r.exception for r in records if r is not records[1]] == [None] * 4
    assert records[3].fields == {"user_id": "42", "tags": "['a', 'b']"}
    assert [r.fields for r in records if r is not records[3]] == [{}] * 4


# -- 2. the relay is down --------------------------------------------------------------------


async def test_emit_does_not_block_while_the_relay_is_down() -> None:
    count, buffer_records, close_timeout = 50_000, 1000, 1.0
    port = free_port()
    with trio.fail_after(TEST_TIMEOUT):
        async with live_handler(
            f"127.0.0.1:{port}",
            app=unique("down"),
            buffer_records=buffer_records,
            close_timeout=close_timeout,
        ) as (handler, log):

            def log_all() -> None:
                for i in range(count):
                    log.info("record %d of %d", i, count)

            await trio.to_thread.run_sync(log_all)
            stats = handler.statistics()
            assert stats.records_logged == count
            assert 0 < stats.records_buffered <= buffer_records
            assert not stats.connected and not stats.streaming
            assert handler.status in ("connecting", "disconnected")

            took = await close_handler(handler)
            assert took <= close_timeout + CLOSE_JOIN_MARGIN, took
            assert handler.status == "closed"


# -- 3. many threads at once -------------------------------------------------------------------


async def test_records_from_many_threads_arrive_exactly_once_in_order(relay: loupelive.Relay) -> None:
    threads, per_thread = 4, 2000
    total = threads * per_thread
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            live_handler(f"127.0.0.1:{relay.agent_port}", app=unique("threads")) as (handler, log),
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            await viewer.wait_for_session(handler.session_id)
            async with (
                viewer.open_stream(handler.session_id, history=total) as stream,
                trio.open_nursery() as nursery,
            ):
                sink = Sink()
                nursery.start_soon(sink.run, stream)
                await wait_streaming(handler)

                start = threading.Barrier(threads, timeout=TEST_TIMEOUT)
                errors: list[BaseException] = []

                def write(k: int) -> None:
                    try:
                        start.wait()
                        for i in range(per_thread):
                            log.info("writer %d record %d", k, i)
                    except BaseException as exc:
                        errors.append(exc)

                writers = [
                    threading.Thread(target=write, args=(k,), name=f"writer-{k}") for k in range(threads)
                ]
                for writer in writers:
                    writer.start()
                for writer in writers:
                    await trio.to_thread.run_sync(writer.join)
                assert not errors

                await sink.wait_count(total)
                assert not sink.ended.is_set(), "the stream ended early"
                await close_handler(handler)
                await sink.ended.wait()
            assert stream.end_code is ErrorCode.SESSION_ENDED

    records = records_of(sink.items)
    assert len(records) == total
    assert [r.seq for r in records] == list(range(1, total + 1))
    by_thread: dict[str, list[int]] = {}
    for record in records:
        k, i = map(int, record.message.removeprefix("writer ").split(" record "))
        assert record.thread == f"writer-{k}", record
        by_thread.setdefault(record.thread, []).append(i)
    assert by_thread == {f"writer-{k}": list(range(per_thread)) for k in range(threads)}
    assert handler.statistics().records_logged == total


# -- 4. no feedback ----------------------------------------------------------------------------


async def test_loupelive_own_records_are_never_published(relay: loupelive.Relay) -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with (
                live_handler(f"127.0.0.1:{relay.agent_port}", app=unique("root"), logger=root) as (
                    handler,
                    _,
                ),
                loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            ):
                await viewer.wait_for_session(handler.session_id)
                async with viewer.open_stream(handler.session_id, history=10_000) as stream:
                    # While it streams, the in-process relay, viewer and the
                    # handler's agent all log under loupelive.* through the root.
                    await wait_streaming(handler)
                    logging.getLogger("loupelive.test").warning("loupelive's own %s", "message")
                    logging.getLogger("loupelive").error("loupelive's root logger")
                    logging.getLogger("handler_test.normal").info("a normal %s", "record")
                    logging.getLogger("loupelive.test").info("loupelive's own after")
                    await close_handler(handler)
                    items = await drain(stream)
                    assert stream.end_code is ErrorCode.SESSION_ENDED
    finally:
        root.setLevel(level)

    records = records_of(items)
    assert "a normal record" in [r.message for r in records]
    own = [r for r in records if r.logger.startswith("loupelive") or "loupelive's" in r.message]
    assert not own, own


async def test_loggers_merely_named_like_loupelive_are_published(relay: loupelive.Relay) -> None:
    """Only loupelive's own loggers (``loupelive`` and ``loupelive.*``) are dropped.

    An application's logger whose name merely starts with the same letters
    (``loupelive_shop``, ``loupelivery``) is the application's, and its
    records must be published like any other.
    """
    loggers = [logging.getLogger(name) for name in ("loupelive_shop.orders", "loupelivery")]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with (
                live_handler(f"127.0.0.1:{relay.agent_port}", app=unique("shop"), logger=loggers[0]) as (
                    handler,
                    _,
                ),
                loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            ):
                loggers[1].addHandler(handler)
                await viewer.wait_for_session(handler.session_id)
                async with viewer.open_stream(handler.session_id, history=100) as stream:
                    await wait_streaming(handler)
                    loggers[0].info("order %d paid", 42)
                    loggers[1].info("parcel %s delivered", "P-9")
                    await close_handler(handler)
                    items = await drain(stream)
                    assert stream.end_code is ErrorCode.SESSION_ENDED
    finally:
        for logger in loggers:
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)

    assert [(r.logger, r.message) for r in records_of(items)] == [
        ("loupelive_shop.orders", "order 42 paid"),
        ("loupelivery", "parcel P-9 delivered"),
    ]


# -- 5. configured from the environment ------------------------------------------------------

FROM_ENV_PROGRAM = """
    import logging
    import sys

    import loupelive

    handler = loupelive.LiveHandler.from_env(app=sys.argv[1])
    log = logging.getLogger("envapp")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.info("configured from %s", "the environment")
    print("session", handler.session_id, flush=True)
    sys.stdin.readline()
"""


async def test_from_env_reads_the_relay_and_token_across_a_subprocess(
    nursery: trio.Nursery, write_script: Callable[[str, str], Path]
) -> None:
    relay: loupelive.Relay = await nursery.start(loupelive.serve_relay, test_config(agent_token="t"))
    script = write_script("from_env.py", FROM_ENV_PROGRAM)
    app = unique("from-env")
    env = child_env(LOUPELIVE_RELAY=f"127.0.0.1:{relay.agent_port}", LOUPELIVE_AGENT_TOKEN="t")
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            run_python(script, app, env=env) as child,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            session_id = (await child.stdout.wait_for_line(r"^session (\S+)$"))[1]
            info = await viewer.wait_for_session(session_id)
            assert (info.app, info.pid) == (app, child.pid)
            async with viewer.open_stream(session_id, history=100) as stream:
                [record] = records_of(await collect(stream, 1))
                assert (record.seq, record.logger, record.message) == (
                    1,
                    "envapp",
                    "configured from the environment",
                )
                await child.write("\n")
                assert records_of(await drain(stream)) == []
                assert stream.end_code is ErrorCode.SESSION_ENDED
            assert await child.wait() == 0
        assert_no_traceback(child.stderr.text)


# -- 6. several handlers, several sessions ----------------------------------------------------


async def test_several_handlers_give_several_sessions(relay: loupelive.Relay) -> None:
    address = f"127.0.0.1:{relay.agent_port}"
    app_a, app_b = unique("billing"), unique("search")
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            live_handler(address, app=app_a) as (handler_a, log_a),
            live_handler(address, app=app_b) as (handler_b, log_b),
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            assert handler_a.session_id != handler_b.session_id
            ids = {handler_a.session_id, handler_b.session_id}
            sessions = await viewer.wait_sessions(lambda s: ids <= {i.session_id for i in s})
            apps = {i.session_id: i.app for i in sessions if i.session_id in ids}
            assert apps == {handler_a.session_id: app_a, handler_b.session_id: app_b}

            async with (
                viewer.open_stream(handler_a.session_id, history=100) as stream_a,
                viewer.open_stream(handler_b.session_id, history=100) as stream_b,
            ):
                # Both viewers live before anything is logged and closed (see
                # test_close_delivers_to_a_viewer_whose_stream_is_starting for
                # a viewer that is not live yet).
                await wait_streaming(handler_a)
                await wait_streaming(handler_b)
                log_a.info("invoice %d", 1)
                log_b.info("query %s", "q")
                log_a.info("invoice %d", 2)
                await close_handler(handler_a)
                await close_handler(handler_b)
                items_a = await drain(stream_a)
                items_b = await drain(stream_b)
                assert stream_a.end_code is stream_b.end_code is ErrorCode.SESSION_ENDED

    assert [(r.seq, r.logger, r.message) for r in records_of(items_a)] == [
        (1, log_a.name, "invoice 1"),
        (2, log_a.name, "invoice 2"),
    ]
    assert [(r.seq, r.logger, r.message) for r in records_of(items_b)] == [(1, log_b.name, "query q")]


# -- 7. fork -----------------------------------------------------------------------------------

FORK_PROGRAM = """
    import logging
    import os
    import sys

    import loupelive

    handler = loupelive.LiveHandler(sys.argv[1], app=sys.argv[2])
    log = logging.getLogger("forker")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.info("parent before fork")
    print("parent", handler.session_id, os.getpid(), flush=True)

    pid = os.fork()
    if pid == 0:
        log.info("child %d after fork", os.getpid())
        print("child", handler.session_id, os.getpid(), flush=True)
        sys.stdin.readline()
        # What a forked worker does before os._exit: close the handlers.
        logging.shutdown()
        os._exit(0)

    _, status = os.waitpid(pid, 0)
    log.info("parent after fork: child exited with %d", os.waitstatus_to_exitcode(status))
    print("parent done", flush=True)
    sys.stdin.readline()
"""


async def test_a_forked_child_gets_a_session_of_its_own(
    relay: loupelive.Relay, write_script: Callable[[str, str], Path]
) -> None:
    script = write_script("forker.py", FORK_PROGRAM)
    app = unique("forker")
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            run_python(script, f"127.0.0.1:{relay.agent_port}", app) as child,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            parent = await child.stdout.wait_for_line(r"^parent (\S+) (\d+)$")
            forked = await child.stdout.wait_for_line(r"^child (\S+) (\d+)$")
            parent_id, child_id = parent[1], forked[1]
            child_pid = int(forked[2])
            assert int(parent[2]) == child.pid and child_pid != child.pid
            assert child_id != parent_id

            parent_info = await viewer.wait_for_session(parent_id)
            child_info = await viewer.wait_for_session(child_id)
            assert (parent_info.app, parent_info.pid) == (app, child.pid)
            assert (child_info.app, child_info.pid) == (app, child_pid)

            async with (
                viewer.open_stream(parent_id, history=100) as parent_stream,
                viewer.open_stream(child_id, history=100) as child_stream,
            ):
                [record] = records_of(await collect(child_stream, 1))
                assert (record.seq, record.message) == (1, f"child {child_pid} after fork")
                [record] = records_of(await collect(parent_stream, 1))
                assert (record.seq, record.message) == (1, "parent before fork")

                # The child reads this line, closes its handler and exits.
                await child.write("child: exit\n")
                assert records_of(await drain(child_stream)) == []
                assert child_stream.end_code is ErrorCode.SESSION_ENDED

                # The parent keeps publishing to its own session.
                [record] = records_of(await collect(parent_stream, 1))
                assert (record.seq, record.message) == (2, "parent after fork: child exited with 0")
                await child.stdout.wait_for_line(r"^parent done$")
                await child.write("parent: exit\n")
                assert records_of(await drain(parent_stream)) == []
                assert parent_stream.end_code is ErrorCode.SESSION_ENDED
            assert await child.wait() == 0
        assert_no_traceback(child.stderr.text)


# -- 8. close() ----------------------------------------------------------------------------------


async def test_close_is_idempotent_and_delivers_what_viewers_are_owed(relay: loupelive.Relay) -> None:
    count, close_timeout = 1000, 5.0
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            live_handler(
                f"127.0.0.1:{relay.agent_port}", app=unique("closing"), close_timeout=close_timeout
            ) as (
                handler,
                log,
            ),
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            await viewer.wait_for_session(handler.session_id)
            async with (
                viewer.open_stream(handler.session_id, history=count) as stream,
                trio.open_nursery() as nursery,
            ):
                sink = Sink()
                nursery.start_soon(sink.run, stream)
                await wait_streaming(handler)

                def burst_then_close() -> tuple[float, float]:
                    for i in range(count):
                        log.info("burst %d", i)
                    started = time.monotonic()
                    handler.close()
                    first = time.monotonic() - started
                    started = time.monotonic()
                    handler.close()
                    second = time.monotonic() - started
                    # Logging after close neither raises nor blocks.
                    log.info("after close")
                    return first, second

                first, second = await trio.to_thread.run_sync(burst_then_close)
                await sink.ended.wait()
            assert stream.end_code is ErrorCode.SESSION_ENDED, (stream.end_code, stream.end_reason)
            assert first <= close_timeout + CLOSE_JOIN_MARGIN, first
            assert second < CLOSE_JOIN_MARGIN, second
            assert handler.status == "closed"

    records = records_of(sink.items)
    assert [r.seq for r in records] == list(range(1, count + 1))
    assert [r.message for r in records] == [f"burst {i}" for i in range(count)]


async def test_close_delivers_to_a_viewer_whose_stream_is_starting(nursery: trio.Nursery) -> None:
    """A viewer the agent already knows is owed the records logged before close().

    The agent has received the viewer (START_STREAM, ADD_VIEWER) and is opening
    its data connection, which the proxy holds, when a record is logged and
    close() is called.  The data connection is let through on the agent's next
    bytes on its control connection after close() began: its GOODBYE if it
    ends the session without waiting for that stream, else its next
    heartbeat (the relay asks for one every 0.5 s).  close() must wait for the
    stream (it has close_timeout for that) and deliver the record before it
    ends the session.
    """
    relay: loupelive.Relay = await nursery.start(
        loupelive.serve_relay, test_config(heartbeat_interval=0.5, heartbeat_timeout=10.0)
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as proxy_nursery:
            proxy = AgentProxy(relay.agent_port, hold_data=True)
            proxy_port = await proxy.serve(proxy_nursery)
            async with (
                live_handler(f"127.0.0.1:{proxy_port}", app=unique("starting"), close_timeout=10.0) as (
                    handler,
                    log,
                ),
                loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            ):
                await viewer.wait_for_session(handler.session_id)
                async with viewer.open_stream(handler.session_id, history=100) as stream:
                    await proxy.held.wait()  # the agent is connecting its data connection
                    await wait_until(lambda: handler.statistics().viewers == 1)  # for this viewer
                    assert not handler.statistics().streaming
                    log.info("owed to the %s", "viewer")
                    async with trio.open_nursery() as closing:
                        closing.start_soon(close_handler, handler)
                        await wait_until(lambda: handler.status == "closed")  # close() has begun
                        proxy.release_on_control_bytes()
                    items = await drain(stream)
                    assert stream.end_code is ErrorCode.SESSION_ENDED
            proxy_nursery.cancel_scope.cancel()
    assert [r.message for r in records_of(items)] == ["owed to the viewer"]


class SeenBy(logging.Handler):
    """Tells a Trio loop (through its token; never blocks) that a matching record was logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self.seen.set)


async def test_close_under_the_handler_lock_does_not_wait_for_the_agent_thread(
    relay: loupelive.Relay,
) -> None:
    """``logging.shutdown()`` calls ``close()`` holding the handler's lock.

    The agent thread logs under ``loupelive.*`` (here: "lost the relay", a
    WARNING, after its connection was cut) and those records reach the
    handler through the root logger.  The handler drops them, but if it takes
    its lock first the agent thread waits for a lock that ``close()`` holds
    while it waits for the agent thread: close() then takes its whole timeout
    (plus the join margin) instead of returning at once.
    """
    close_timeout = 2.0
    root = logging.getLogger()
    agent_logger = logging.getLogger("loupelive.agent")
    seen = SeenBy("lost the relay")
    agent_logger.addHandler(seen)  # runs before the root's handlers, in the agent thread
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as proxy_nursery:
                proxy = AgentProxy(relay.agent_port)
                port = await proxy.serve(proxy_nursery)
                async with live_handler(
                    f"127.0.0.1:{port}", app=unique("shutdown"), logger=root, close_timeout=close_timeout
                ) as (handler, _):
                    await wait_until(lambda: handler.status == "connected")
                    locked, go = trio.Event(), trio.Event()

                    def like_logging_shutdown() -> float:
                        # What logging.shutdown() does for each handler.
                        handler.acquire()
                        try:
                            trio.from_thread.run_sync(locked.set)
                            trio.from_thread.run(go.wait)
                            handler.flush()
                            started = time.monotonic()
                            handler.close()
                            return time.monotonic() - started
                        finally:
                            handler.release()

                    async with trio.open_nursery() as nursery:
                        took: list[float] = []

                        async def shut_down() -> None:
                            took.append(await trio.to_thread.run_sync(like_logging_shutdown))

                        nursery.start_soon(shut_down)
                        await locked.wait()
                        proxy.cut()  # the agent loses the relay and says so
                        await seen.seen.wait()
                        go.set()
                assert took[0] < close_timeout, f"close() took {took[0]:.1f} s under the handler's lock"
                proxy_nursery.cancel_scope.cancel()
    finally:
        agent_logger.removeHandler(seen)

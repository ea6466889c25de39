"""The test-harness API, used the way a test suite uses it.

``loupelive.testing`` (``open_relay``, ``open_capture``, ``Capture``) against
real programs: Python subprocesses that log through nothing but ``logging``
and ``LiveHandler.from_env``, configured by ``TestRelay.env()``.  The pytest
plugin (``loupe_relay``, ``loupe_capture``, the report section, ``--loupe-relay``)
is exercised in inner pytest runs (``pytester.runpytest_subprocess``), each in
a clean process of its own.

Nothing waits on time: the tests wait on captured records, on the inner run's
connection to a barrier, or on a condition, always under ``trio.fail_after``.
The one ``trio.sleep`` runs under ``autojump_clock``, in virtual time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

import loupelive
from loupelive import ErrorCode, Level, LiveHandler, Record
from loupelive.testing import TestRelay, open_capture, open_relay

from .conftest import TEST_TIMEOUT, wait_until

pytest_plugins = ["pytester"]

#: Every inner pytest run: no cache files, pytest-trio on, warnings are errors.
INNER_ARGS = ("-p", "no:cacheprovider", "-o", "trio_mode=true", "-W", "error")

#: Under the autojump clock, ``fail_after`` counts virtual seconds too.
VIRTUAL_TIMEOUT = 600

#: Virtual seconds to sit idle: longer than the relay's heartbeat timeout
#: (45 s), so the session survives only if heartbeats flow in virtual time.
HEARTBEAT_DEADLINE_PASSED = 60

#: Real seconds a test in virtual time may take, at most (it takes a fraction).
VIRTUAL_TEST_REAL_SECONDS = 5.0

#: How much longer an inner pytest run may take with ``--loupe-relay`` aimed at
#: a port nobody listens on than without the option.  Connecting is refused at
#: once, so this is slack for a noisy machine; it is well under the handler's
#: ``close_timeout`` (5 s), which a run must not sit out when nothing is owed.
UNREACHABLE_RELAY_SLOWDOWN = 2.0


# -- helpers -------------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """This process's environment without any ``LOUPELIVE_*`` variable.

    ``relay.env()`` only names what its relay needs, so a ``LOUPELIVE_CA`` or
    ``LOUPELIVE_AGENT_TOKEN`` set in the developer's shell must not leak in.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("LOUPELIVE_")}


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    return write


@contextlib.asynccontextmanager
async def run_script(script: Path, *args: str, env: dict[str, str]) -> AsyncIterator[trio.Process]:
    """``python -u SCRIPT ARGS`` with a pipe on stdin; killed and reaped at the end.

    Its stdout and stderr are this process's (pytest shows them on failure).
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-u", str(script), *args], stdin=subprocess.PIPE, env=env
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(TEST_TIMEOUT):
                await process.wait()
            if process.stdin is not None:
                await process.stdin.aclose()


async def send_lines(process: trio.Process, *lines: str) -> None:
    assert process.stdin is not None
    await process.stdin.send_all("".join(line + "\n" for line in lines).encode("utf-8"))


async def finish(process: trio.Process) -> int:
    """Close the program's stdin (it exits) and wait for its exit code."""
    assert process.stdin is not None
    await process.stdin.aclose()
    return await process.wait()


def messages(records: list[Record]) -> list[str]:
    return [record.message for record in records]


#: A program under test: logs "ready", then one record per line of stdin
#: ("LEVEL message", or "EXCEPTION message" to log a traceback), until stdin
#: closes; then "stdin closed, bye" just before it exits.
LOGGING_PROGRAM = """
    import logging
    import sys

    import loupelive

    app = sys.argv[1]
    logging.getLogger().addHandler(loupelive.LiveHandler.from_env(app=app))
    log = logging.getLogger(app + ".main")
    log.setLevel(logging.DEBUG)
    log.info("ready")

    for line in sys.stdin:
        level, _, message = line.rstrip("\\n").partition(" ")
        if level == "EXCEPTION":
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                log.exception(message)
        else:
            log.log(getattr(logging, level), message, extra={"command": level.lower()})
    log.info("stdin closed, bye")
"""

#: One line of ``Capture.dump()`` / ``assert_no``'s message.
DUMP_LINE = re.compile(
    r"^\[(?P<app>[\w-]+)\] \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +(?P<logger>\S*): (?P<message>.*)$"
)


# -- Capture.wait_for and friends, across real processes ----------------------------------


async def test_wait_for_the_records_of_real_processes(write_script: Callable[[str, str], Path]) -> None:
    script = write_script("logging_program.py", LOGGING_PROGRAM)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_relay() as relay,
            open_capture(relay) as everything,
            open_capture(relay, app="alpha") as alpha_only,
            open_capture(relay, app="nobody") as nothing,
        ):
            env = {**clean_environ(), **relay.env()}
            async with (
                run_script(script, "alpha", env=env) as alpha,
                run_script(script, "beta", env=env) as beta,
            ):
                # A string: contained in the message; app= picks the session.
                ready = await everything.wait_for("ready", app="beta")
                assert (ready.logger, ready.level, ready.seq) == ("beta.main", Level.INFO, 1)
                ready = await everything.wait_for("ready", app="alpha")
                assert (ready.logger, ready.level, ready.seq) == ("alpha.main", Level.INFO, 1)

                await send_lines(
                    alpha,
                    "DEBUG order 17 accepted",
                    "WARNING disk at 91%",
                    "ERROR disk full",
                    "EXCEPTION payment P-3 failed",
                )
                # A compiled regex: searched in the message.
                order = await everything.wait_for(re.compile(r"order (\d+) accepted$"))
                assert order.level is Level.DEBUG and order.fields == {"command": "debug"}
                # A predicate: any test of the record.
                failed = await everything.wait_for(lambda record: record.exception is not None)
                assert failed.message == "payment P-3 failed" and failed.level is Level.ERROR
                assert failed.exception is not None
                assert failed.exception.rstrip().endswith("RuntimeError: boom"), failed.exception
                # level= is a minimum: the WARNING about the disk (already captured,
                # and first) does not count.
                assert (await everything.wait_for("disk at 91%")).level is Level.WARNING
                full = await everything.wait_for("disk", level=Level.ERROR)
                assert (full.message, full.level) == ("disk full", Level.ERROR)
                # app=: alpha's disk records are captured; only beta's counts.
                await send_lines(beta, "WARNING disk at 45%")
                beta_disk = await everything.wait_for("disk", app="beta")
                assert (beta_disk.message, beta_disk.logger) == ("disk at 45%", "beta.main")

                # A record that arrives while wait_for waits for it.
                late: list[Record] = []

                async def wait_late() -> None:
                    late.append(await everything.wait_for(re.compile("^late arrival$"), app="alpha"))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_late)
                    await trio.testing.wait_all_tasks_blocked()
                    assert late == []
                    await send_lines(alpha, "INFO late arrival")
                assert late[0].seq == 6 and late[0].logger == "alpha.main"

                assert await finish(alpha) == 0
                assert await finish(beta) == 0
                # Logged just before exit: delivered by the handler's close().
                await everything.wait_for("bye", app="alpha")
                await everything.wait_for("bye", app="beta")
                await alpha_only.wait_for("bye")

    alpha_messages = [
        "ready",
        "order 17 accepted",
        "disk at 91%",
        "disk full",
        "payment P-3 failed",
        "late arrival",
        "stdin closed, bye",
    ]
    beta_messages = ["ready", "disk at 45%", "stdin closed, bye"]
    # records: arrival order, which is seq order within a session.
    assert messages(alpha_only.records) == alpha_messages
    assert [r.seq for r in alpha_only.records] == list(range(1, 8))
    assert {r.logger for r in alpha_only.records} == {"alpha.main"}
    assert [r.message for r in everything.records if r.logger == "alpha.main"] == alpha_messages
    assert [r.message for r in everything.records if r.logger == "beta.main"] == beta_messages
    assert len(everything.records) == len(alpha_messages) + len(beta_messages)
    assert nothing.records == []
    assert not everything.gaps

    # assert_no: quiet when nothing matches …
    everything.assert_no(level=Level.CRITICAL)
    everything.assert_no("disk at")  # the default level is ERROR: these are WARNINGs
    everything.assert_no(level=Level.ERROR, app="beta")
    everything.assert_no(re.compile("^disk at 9"), level=Level.WARNING, app="beta")
    everything.assert_no(lambda record: record.fields.get("command") == "critical", level=Level.DEBUG)
    nothing.assert_no(level=Level.DEBUG)
    # … and a readable failure naming every offending record otherwise.
    with pytest.raises(AssertionError) as exc_info:
        everything.assert_no(level=Level.ERROR)
    lines = str(exc_info.value).splitlines()
    assert lines[0] == "2 unexpected record(s) at ERROR or above:", lines
    first, second = (DUMP_LINE.match(line) for line in (lines[1], lines[2]))
    assert first is not None and second is not None, lines
    assert first.group("app", "level", "logger", "message") == ("alpha", "ERROR", "alpha.main", "disk full")
    assert second.group("app", "level", "logger", "message") == (
        "alpha",
        "ERROR",
        "alpha.main",
        "payment P-3 failed",
    )
    # The traceback follows its record, indented.
    assert lines[3] == "    Traceback (most recent call last):", lines
    assert lines[-1] == "    RuntimeError: boom", lines
    with pytest.raises(
        AssertionError, match=r"^1 unexpected record\(s\) at WARNING or above:\n\[beta\] .*disk at 45%$"
    ):
        everything.assert_no("disk", level=Level.WARNING, app="beta")
    with pytest.raises(
        AssertionError, match=r"^1 unexpected record\(s\) at DEBUG or above:\n.*order 17 accepted$"
    ):
        everything.assert_no(re.compile(r"order \d+"), level=Level.DEBUG)

    # dump: every record, one line each (plus its traceback), in arrival order.
    dump = everything.dump().splitlines()
    record_lines = [line for line in dump if not line.startswith("    ")]
    assert len(record_lines) == len(everything.records)
    parsed = [DUMP_LINE.match(line) for line in record_lines]
    assert all(parsed), dump
    assert [(m["app"], m["level"], m["logger"], m["message"]) for m in parsed if m] == [
        ({"alpha.main": "alpha", "beta.main": "beta"}[r.logger], r.level.name, r.logger, r.message)
        for r in everything.records
    ]
    traceback = [line for line in dump if line.startswith("    ")]
    assert (
        traceback[0] == "    Traceback (most recent call last):" and traceback[-1] == "    RuntimeError: boom"
    )
    assert nothing.dump() == "(no records captured)"


# -- virtual time ---------------------------------------------------------------------


async def test_a_capture_works_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    started = time.monotonic()
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with (
            open_relay() as relay,
            open_capture(relay, app="virtual") as capture,
            loupelive.open_agent(connector=relay.memory_connector("agent"), app="virtual") as agent,
        ):
            assert HEARTBEAT_DEADLINE_PASSED > relay.config.heartbeat_timeout
            agent.log(Level.INFO, "before the pause", logger="clock")
            await capture.wait_for("before the pause")

            before = trio.current_time()
            await trio.sleep(HEARTBEAT_DEADLINE_PASSED)
            assert trio.current_time() - before >= HEARTBEAT_DEADLINE_PASSED

            # The session lived through it: same session, same stream, no gap.
            agent.log(Level.WARNING, "after the pause", logger="clock")
            after = await capture.wait_for("after the pause", level=Level.WARNING, app="virtual")
            assert after.seq == 2
            assert messages(capture.records) == ["before the pause", "after the pause"]
            assert not capture.gaps
            assert agent.statistics().connected and agent.statistics().viewers == 1
            assert relay.statistics().sessions == 1

            # A capture opened now gets the session's history too.
            async with open_capture(relay, app="virtual") as late:
                await late.wait_for("after the pause")
                assert messages(late.records) == ["before the pause", "after the pause"]
    assert time.monotonic() - started < VIRTUAL_TEST_REAL_SECONDS


# -- env() and from_env(), across a process boundary ----------------------------------------


async def test_env_carries_the_agent_token_to_a_subprocess(write_script: Callable[[str, str], Path]) -> None:
    script = write_script("logging_program.py", LOGGING_PROGRAM)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_relay(agent_token="t") as relay, open_capture(relay) as capture:
            assert relay.env() == {
                "LOUPELIVE_RELAY": f"127.0.0.1:{relay.agent_port}",
                "LOUPELIVE_AGENT_TOKEN": "t",
            }
            async with run_script(script, "tokened", env={**clean_environ(), **relay.env()}) as child:
                ready = await capture.wait_for("ready", app="tokened")
                assert ready.logger == "tokened.main"
                assert await finish(child) == 0
                await capture.wait_for("bye", app="tokened")

            # Without the token, the same program is refused: the variable is
            # what let it in.
            no_token = {**clean_environ(), "LOUPELIVE_RELAY": relay.env()["LOUPELIVE_RELAY"]}
            async with run_script(script, "untokened", env=no_token):
                await wait_until(lambda: relay.statistics().rejected.get(ErrorCode.BAD_TOKEN.value, 0) >= 1)
            capture.assert_no(level=Level.DEBUG, app="untokened")
    assert [r.message for r in capture.records] == ["ready", "stdin closed, bye"]


async def test_env_is_empty_of_optional_settings_by_default() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_relay() as relay:
            assert isinstance(relay, TestRelay)
            assert relay.env() == {"LOUPELIVE_RELAY": f"127.0.0.1:{relay.agent_port}"}
            assert relay.agent_port > 0 and relay.viewer_port > 0
            assert relay.agent_port != relay.viewer_port


# -- a relay with TLS --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_options(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """``open_relay`` options for TLS with a certificate issued by ``ca`` (as in production)."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "relay.pem", tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return {"tls_cert": str(cert_file), "tls_key": str(key_file)}


async def test_a_capture_of_a_tls_relay(ca: trustme.CA, tls_options: dict[str, str]) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_relay(**tls_options) as relay,
            open_capture(relay) as capture,
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="secure", tls=context) as agent,
        ):
            agent.log(Level.INFO, "over TLS")
            assert (await capture.wait_for("over TLS", app="secure")).seq == 1


async def test_env_names_a_ca_file_that_verifies_a_tls_relay(
    ca: trustme.CA, tls_options: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A certificate issued by a CA: open_relay is told the CA, env() passes it on.
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with trio.fail_after(TEST_TIMEOUT):
        async with open_relay(ca_file=str(ca_file), **tls_options) as relay:
            env = relay.env()
            assert sorted(env) == ["LOUPELIVE_CA", "LOUPELIVE_RELAY"]
            monkeypatch.delenv("LOUPELIVE_AGENT_TOKEN", raising=False)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            # The constructor waits for its agent thread; close() joins it.
            handler = await trio.to_thread.run_sync(functools.partial(LiveHandler.from_env, app="tls-env"))
            try:
                await wait_until(lambda: handler.status != "connecting")
                assert handler.status == "connected", handler.last_error
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(handler.close)


# -- the pytest plugin ---------------------------------------------------------------------

INNER_FIXTURES = """
    import trio

    import loupelive
    from loupelive.testing import Capture, TestRelay


    async def test_the_fixtures(loupe_relay, loupe_capture):
        assert isinstance(loupe_relay, TestRelay) and isinstance(loupe_capture, Capture)
        assert loupe_relay.env() == {"LOUPELIVE_RELAY": f"127.0.0.1:{loupe_relay.agent_port}"}
        with trio.fail_after(30):
            async with (
                loupelive.open_agent("127.0.0.1", loupe_relay.agent_port, app="over-tcp") as tcp,
                loupelive.open_agent(connector=loupe_relay.memory_connector("agent"), app="in-memory") as mem,
            ):
                tcp.log(loupelive.Level.INFO, "hello over TCP")
                mem.log(loupelive.Level.WARNING, "hello in memory")
                assert (await loupe_capture.wait_for("hello", app="over-tcp")).message == "hello over TCP"
                assert (await loupe_capture.wait_for("hello", app="in-memory")).message == "hello in memory"
        loupe_capture.assert_no()


    async def test_each_test_has_a_relay_of_its_own(loupe_relay, loupe_capture):
        assert loupe_relay.statistics().sessions == 0
        assert loupe_capture.records == []
"""


def test_the_fixtures_work_in_a_test_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_FIXTURES)
    result = pytester.runpytest_subprocess(*INNER_ARGS, timeout=TEST_TIMEOUT)
    result.assert_outcomes(passed=2)


INNER_FAILING = """
    import trio

    import loupelive


    async def test_waits_in_vain(loupe_relay, loupe_capture, autojump_clock):
        connector = loupe_relay.memory_connector("agent")
        async with loupelive.open_agent(connector=connector, app="widgets") as agent:
            agent.log(loupelive.Level.ERROR, "the widget broke", logger="inner.widgets")
            agent.log(loupelive.Level.INFO, "retrying the widget", logger="inner.widgets")
            with trio.fail_after(5):  # virtual seconds
                await loupe_capture.wait_for("the widget works")


    async def test_fails_without_a_capture(loupe_relay):
        assert loupe_relay.statistics().sessions == 1, "no capture here"
"""


def test_a_failing_test_shows_the_captured_records(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_FAILING)
    result = pytester.runpytest_subprocess(*INNER_ARGS, timeout=TEST_TIMEOUT)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_waits_in_vain _*",
            "*TooSlowError*",
            "*- Captured loupelive records -*",
            "?widgets? ??:??:??.??? ERROR    inner.widgets: the widget broke",
            "?widgets? ??:??:??.??? INFO     inner.widgets: retrying the widget",
            "*_ test_fails_without_a_capture _*",
        ]
    )
    # Only the test that used loupe_capture gets the section.
    assert result.stdout.str().count("Captured loupelive records") == 1


INNER_PASSING = """
    import trio

    import loupelive


    async def test_passes(loupe_relay, loupe_capture):
        connector = loupe_relay.memory_connector("agent")
        async with loupelive.open_agent(connector=connector, app="gadgets") as agent:
            agent.log(loupelive.Level.ERROR, "the gadget hiccuped", logger="inner.gadgets")
            with trio.fail_after(30):
                await loupe_capture.wait_for("hiccuped")
        print("the test printed this")
"""


def test_a_passing_test_shows_no_captured_records(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_PASSING)
    # -rA shows the report sections of passing tests too.
    result = pytester.runpytest_subprocess(*INNER_ARGS, "-rA", timeout=TEST_TIMEOUT)
    result.assert_outcomes(passed=1)
    output = result.stdout.str()
    assert "the test printed this" in output  # the sections of passing tests are shown …
    assert "Captured loupelive records" not in output  # … but not the records
    assert "the gadget hiccuped" not in output


INNER_LIVE = """
    import logging
    import socket

    BARRIER = ("127.0.0.1", {barrier_port})


    def test_first():
        logging.getLogger("inner.live").warning("from the %s test", "first")


    def test_second():
        logging.getLogger("inner.live").warning("from the %s test", "second")
        # Stay until the outer test has seen the records (or gives up).
        with socket.create_connection(BARRIER, timeout=30) as sock, sock.makefile("rb") as answer:
            assert answer.read() == b"go"
"""

INNER_LIVE_CONFTEST = """
    import logging


    def pytest_sessionfinish(session):
        logging.getLogger("inner.session").warning("the session finished")
"""


async def test_loupe_relay_streams_the_run_live(pytester: pytest.Pytester) -> None:
    app = "inner-run"
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_relay() as relay,
            open_capture(relay, app=app) as capture,
            trio.open_nursery() as nursery,
        ):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            async with listeners[0] as barrier:
                barrier_port = barrier.socket.getsockname()[1]
                pytester.makeconftest(INNER_LIVE_CONFTEST)
                pytester.makepyfile(test_live=textwrap.dedent(INNER_LIVE).format(barrier_port=barrier_port))
                run = functools.partial(
                    pytester.runpytest_subprocess,
                    *INNER_ARGS,
                    "--loupe-relay",
                    f"127.0.0.1:{relay.agent_port}",
                    "--loupe-app",
                    app,
                    timeout=TEST_TIMEOUT,
                )
                results: list[pytest.RunResult] = []

                async def run_inner() -> None:
                    results.append(await trio.to_thread.run_sync(run))

                nursery.start_soon(run_inner)
                first = await capture.wait_for("from the first test")
                second = await capture.wait_for("from the second test")
                connection = await barrier.accept()
                async with connection:
                    await connection.send_all(b"go")
        # The inner run has ended (the nursery waited for it).
        (result,) = results
        result.assert_outcomes(passed=2)
        # Logged after the last test, delivered as the run's handler closed.
        finished = await capture.wait_for("the session finished")

    assert (first.level, first.logger) == (Level.WARNING, "inner.live")
    assert first.fields["test"] == "test_live.py::test_first", first.fields
    assert second.fields["test"] == "test_live.py::test_second", second.fields
    assert finished.fields["test"] == "", finished.fields
    assert messages(capture.records) == [
        "from the first test",
        "from the second test",
        "the session finished",
    ]


INNER_UNREACHABLE = """
    import logging


    def test_logs_a_lot():
        log = logging.getLogger("inner.busy")
        for i in range(1000):
            log.warning("record %d", i)
"""


def test_an_unreachable_loupe_relay_neither_fails_nor_slows_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_UNREACHABLE)
    without = pytester.runpytest_subprocess(*INNER_ARGS, timeout=TEST_TIMEOUT)
    without.assert_outcomes(passed=1)
    # Port 1: nobody listens there, so every connection attempt is refused.
    result = pytester.runpytest_subprocess(
        *INNER_ARGS, "--loupe-relay", "127.0.0.1:1", "--loupe-app", "nowhere", timeout=TEST_TIMEOUT
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    slowdown = result.duration - without.duration
    assert slowdown < UNREACHABLE_RELAY_SLOWDOWN, (
        f"the run took {result.duration:.1f} s with --loupe-relay 127.0.0.1:1, "
        f"{without.duration:.1f} s without"
    )

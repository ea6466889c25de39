"""End-to-end tests of the command line: ``python -m loupelive ...`` in real subprocesses.

Every test runs under ``trio.fail_after(TEST_TIMEOUT)`` and waits on the
children's output, never on time; children are killed and reaped in ``finally``
(see :mod:`tests.cli_helpers`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import trio

from .cli_helpers import (
    SIGNALS,
    TEST_TIMEOUT,
    Child,
    Lines,
    assert_cli_error,
    assert_no_traceback,
    has_ansi,
    json_lines,
    run_cli,
    run_once,
    start_relay,
    wait_for_connection,
)

SESSION_FIELDS = {
    "session_id",
    "app",
    "host",
    "pid",
    "started_at",
    "tags",
    "connected_at",
    "viewers",
    "streaming",
}

TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +")


async def pipe_session_id(pipe: Child, app: str) -> str:
    """The session id ``pipe`` logs once the relay accepted its registration."""
    match = await pipe.stderr.wait_for_line(
        rf"^loupelive: session (\S+): publishing stdin as app {re.escape(app)}$",
        "the registration log line",
    )
    return match[1]


def records_of(objects: list[dict[str, object]]) -> list[dict[str, object]]:
    return [obj for obj in objects if obj["type"] == "record"]


# -- 1. pipe -> relay -> tail, text lines -------------------------------------------------


async def test_pipe_lines_reach_a_waiting_tail_complete_and_in_order(tmp_path: Path) -> None:
    count = 200
    lines = [f"line {i:04d} {'é✓ ' * (i % 4)}{'x' * (i % 37)}" for i in range(1, count + 1)]
    lines[41] = ""  # an empty line is a line too
    lines[99] = "  leading and trailing spaces  "
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            async with run_cli(
                "tail",
                "piped",
                "--relay",
                relay.viewer,
                "--wait",
                "--format",
                "json",
                "--history",
                "1000",
            ) as tail:
                # tail is connected and waiting before the session exists.
                await wait_for_connection(tail, relay.viewer_port)
                assert tail.returncode is None
                assert tail.stdout.lines == []
                async with run_cli("pipe", "--app", "piped", "--relay", relay.agent, stdin=True) as pipe:
                    session_id = await pipe_session_id(pipe, "piped")
                    await pipe.write(lines[0] + "\n")
                    # Only once tail has joined may the session end.
                    await tail.stdout.wait_count(1, "the first record")
                    await pipe.write("".join(line + "\n" for line in lines[1:]))
                    await pipe.close_stdin()
                    assert await pipe.wait() == 0, pipe.describe()
                assert await tail.wait() == 0, tail.describe()

            objects = json_lines(tail.stdout.lines)
            types = [obj["type"] for obj in objects]
            assert "gap" not in types, tail.describe()
            assert types == ["record"] * count + ["session_ended"], tail.describe()
            records = objects[:-1]
            assert [r["message"] for r in records] == lines
            seqs = [r["seq"] for r in records]
            assert seqs == list(range(1, count + 1)), "seqs must increase strictly, without holes"
            for record in records:
                assert record["level"] == "INFO"
                assert record["logger"] == "stdin"
                assert record["thread"] == ""
                assert record["exception"] is None
                assert record["fields"] == {}
                assert isinstance(record["timestamp"], float)
            stamps = [r["timestamp"] for r in records]
            assert stamps == sorted(stamps)
            assert objects[-1] == {
                "type": "session_ended",
                "session_id": session_id,
                "reason": "session_ended",
                "status": "ended",
            }
            assert tail.stderr.text == "", tail.describe()
            assert_no_traceback(pipe.stderr.text)
            assert all(line.startswith("loupelive: ") for line in pipe.stderr.lines), pipe.describe()
            assert_no_traceback(relay.child.stderr.text)


# -- 2. pipe --format json ------------------------------------------------------------------


async def test_pipe_json_records_keep_level_logger_fields_and_text_lines_still_arrive(
    tmp_path: Path,
) -> None:
    inputs = [
        {"level": "warning", "logger": "app.http", "message": "slow request", "fields": {"path": "/cart"}},
        {
            "level": "debug",
            "logger": "app.db",
            "message": "query took 3ms",
            "fields": {"table": "orders", "ms": 3},
        },
        "this line is not JSON",
        {
            "level": "ERROR",
            "logger": "app.pay",
            "message": "charge failed",
            "thread": "worker-2",
            "exception": "ValueError: card declined",
            "fields": {"order": 42},
        },
        {"level": "critical", "message": "disk full", "timestamp": 1700000000.25},
        {"message": "no level given"},
        "[1, 2, 3]",
        {"level": "info", "logger": "app", "message": "done"},
    ]
    expected = [
        ("WARNING", "app.http", "slow request", {"path": "/cart"}),
        ("DEBUG", "app.db", "query took 3ms", {"table": "orders", "ms": "3"}),
        ("INFO", "stdin", "this line is not JSON", {}),
        ("ERROR", "app.pay", "charge failed", {"order": "42"}),
        ("CRITICAL", "", "disk full", {}),
        ("INFO", "", "no level given", {}),
        ("INFO", "stdin", "[1, 2, 3]", {}),
        ("INFO", "app", "done", {}),
    ]
    text = [item if isinstance(item, str) else json.dumps(item) for item in inputs]
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            async with run_cli(
                "tail", "jsonapp", "--relay", relay.viewer, "--wait", "--format", "json", "--history", "100"
            ) as tail:
                async with run_cli(
                    "pipe", "--app", "jsonapp", "--format", "json", "--relay", relay.agent, stdin=True
                ) as pipe:
                    await pipe_session_id(pipe, "jsonapp")
                    await pipe.write(text[0] + "\n")
                    await tail.stdout.wait_count(1, "the first record")
                    await pipe.write("".join(line + "\n" for line in text[1:]))
                    await pipe.close_stdin()
                    assert await pipe.wait() == 0, pipe.describe()
                assert await tail.wait() == 0, tail.describe()

            objects = json_lines(tail.stdout.lines)
            assert objects[-1]["type"] == "session_ended", tail.describe()
            records = records_of(objects)
            assert len(records) == len(objects) - 1, tail.describe()
            got = [(r["level"], r["logger"], r["message"], r["fields"]) for r in records]
            assert got == expected
            assert [r["seq"] for r in records] == list(range(1, len(expected) + 1))
            assert records[3]["thread"] == "worker-2"
            assert records[3]["exception"] == "ValueError: card declined"
            assert records[4]["timestamp"] == 1700000000.25
            assert records[0]["exception"] is None

            # One warning on pipe's stderr, however many lines were not JSON.
            warnings = [line for line in pipe.stderr.lines if "not a JSON record" in line]
            assert len(warnings) == 1, pipe.describe()
            assert warnings[0].startswith("loupelive: ")
            assert "sending it as text" in warnings[0]
            assert_no_traceback(pipe.stderr.text)
            assert_no_traceback(relay.child.stderr.text)


# -- 3. sessions ------------------------------------------------------------------------


async def test_sessions_lists_a_live_session_as_json_and_as_a_table(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            empty = await run_once("sessions", "--relay", relay.viewer)
            assert (empty.returncode, empty.stdout) == (0, "no live sessions\n"), str(empty)
            empty_json = await run_once("sessions", "--relay", relay.viewer, "--format", "json")
            assert (empty_json.returncode, json.loads(empty_json.stdout)) == (0, []), str(empty_json)

            before = time.time()
            async with run_cli(
                "pipe", "--app", "inventory", "--app-version", "2.5.1", "--relay", relay.agent, stdin=True
            ) as pipe:
                session_id = await pipe_session_id(pipe, "inventory")
                listed = await run_once("sessions", "--relay", relay.viewer, "--format", "json")
                assert listed.returncode == 0, str(listed)
                assert listed.stderr == "", str(listed)
                sessions = json.loads(listed.stdout)
                assert len(sessions) == 1, str(listed)
                info = sessions[0]
                assert set(info) >= SESSION_FIELDS
                assert info["session_id"] == session_id
                assert info["app"] == "inventory"
                assert info["app_version"] == "2.5.1"
                assert info["host"] == socket.gethostname()
                assert info["pid"] == pipe.pid
                assert info["tags"] == {}
                assert before - 1 <= info["started_at"] <= time.time()
                assert info["started_at"] <= info["connected_at"] <= time.time()
                assert info["viewers"] == 0
                assert info["streaming"] is False

                table = await run_once("sessions", "--relay", relay.viewer)
                assert table.returncode == 0, str(table)
                header, *rows = table.stdout.splitlines()
                assert header.split() == [
                    "SESSION",
                    "APP",
                    "VERSION",
                    "ENV",
                    "HOST",
                    "PID",
                    "USER",
                    "STARTED",
                    "STATUS",
                    "RECORDS",
                    "ERRORS",
                    "WARNINGS",
                    "REC/S",
                    "VIEWERS",
                    "STREAMING",
                ]
                assert len(rows) == 1, table.stdout
                cells = rows[0].split()
                assert cells[:6] == [
                    session_id,
                    "inventory",
                    "2.5.1",
                    "-",
                    socket.gethostname(),
                    str(pipe.pid),
                ]
                assert cells[-7:] == ["running", "0", "0", "0", "-", "0", "no"]
                assert not has_ansi(table.stdout)

                await pipe.close_stdin()
                assert await pipe.wait() == 0, pipe.describe()
            assert_no_traceback(relay.child.stderr.text)


async def test_sessions_watch_reports_a_session_coming_and_going(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            async with run_cli("sessions", "--watch", "--format", "json", "--relay", relay.viewer) as watch:
                (first,) = await watch.stdout.wait_count(1, "the initial list")
                assert json.loads(first) == []
                async with run_cli("pipe", "--app", "watched", "--relay", relay.agent, stdin=True) as pipe:
                    session_id = await pipe_session_id(pipe, "watched")
                    await watch.stdout.wait_count(2, "the 'added' event")
                    await pipe.close_stdin()
                    assert await pipe.wait() == 0, pipe.describe()
                await watch.stdout.wait_for_line(r'"type": "ended"', "the 'ended' event")
                assert watch.returncode is None, watch.describe()

            events = json_lines(watch.stdout.lines[1:])
            assert events[0]["type"] == "added"
            assert events[0]["session"]["session_id"] == session_id
            assert events[0]["session"]["app"] == "watched"
            assert events[-1] == {
                "type": "ended",
                "session_id": session_id,
                "reason": "session_ended",
                "status": "ended",
            }
            assert {e["type"] for e in events[1:-1]} <= {"changed", "counts"}


# -- 4. tail text format ------------------------------------------------------------------


async def test_tail_text_is_plain_when_not_a_tty_and_level_filters(tmp_path: Path) -> None:
    inputs = [
        ("warning", "app.http", "first warning", {"path": "/a"}),
        ("info", "app.http", "request served", {"status": 200}),
        ("debug", "app.db", "query plan", {}),
        ("error", "app.pay", "payment failed", {"order": 7}),
        ("info", "app", "still running", {}),
        ("critical", "app", "going down", {}),
    ]
    text = "".join(
        json.dumps({"level": lvl, "logger": lg, "message": msg, "fields": f}) + "\n"
        for lvl, lg, msg, f in inputs
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            common = ("--relay", relay.viewer, "--wait", "--history", "100")
            async with (
                run_cli("tail", "textapp", *common) as everything,
                run_cli("tail", "textapp", *common, "--level", "warning") as warnings,
            ):
                async with run_cli(
                    "pipe", "--app", "textapp", "--format", "json", "--relay", relay.agent, stdin=True
                ) as pipe:
                    session_id = await pipe_session_id(pipe, "textapp")
                    first, rest = text.split("\n", 1)
                    await pipe.write(first + "\n")
                    await everything.stdout.wait_count(1, "the first record")
                    await warnings.stdout.wait_count(1, "the first record")
                    await pipe.write(rest)
                    await pipe.close_stdin()
                    assert await pipe.wait() == 0, pipe.describe()
                assert await everything.wait() == 0, everything.describe()
                assert await warnings.wait() == 0, warnings.describe()

            for tail in (everything, warnings):
                assert not has_ansi(tail.stdout.text), tail.describe()
                assert not has_ansi(tail.stderr.text), tail.describe()
                for line in tail.stdout.lines:
                    assert TEXT_LINE.match(line), line
                assert (
                    tail.stderr.lines[0]
                    == f"loupelive: watching session {session_id} (textapp on {socket.gethostname()})"
                )
                assert tail.stderr.lines[-1] == f"loupelive: session {session_id} ended (session_ended)"
                assert_no_traceback(tail.stderr.text)

            levels = [TEXT_LINE.match(line)[1] for line in everything.stdout.lines]  # type: ignore[index]
            assert levels == ["WARNING", "INFO", "DEBUG", "ERROR", "INFO", "CRITICAL"]
            assert everything.stdout.lines[1].endswith(" app.http request served  status=200")
            assert everything.stdout.lines[3].endswith(" app.pay payment failed  order=7")
            assert everything.stdout.lines[4].endswith(" app still running")

            levels = [TEXT_LINE.match(line)[1] for line in warnings.stdout.lines]  # type: ignore[index]
            assert levels == ["WARNING", "ERROR", "CRITICAL"], warnings.describe()
            assert warnings.stdout.lines[0].endswith(" app.http first warning  path=/a")


async def test_tail_text_is_coloured_on_a_tty(tmp_path: Path) -> None:
    """The positive control for the test above: on a terminal, levels get colours."""
    lines = [
        json.dumps({"level": "warning", "message": "careful"}),
        json.dumps({"level": "info", "message": "fine"}),
        json.dumps({"level": "error", "message": "broken"}),
    ]
    master, slave = os.openpty()
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            try:
                async with run_cli(
                    "tail", "ttyapp", "--relay", relay.viewer, "--wait", "--history", "10", stdout=slave
                ) as tail:
                    os.close(slave)
                    slave = -1
                    terminal = Lines("the tail's terminal")
                    async with trio.lowlevel.FdStream(master) as stream, trio.open_nursery() as nursery:
                        master = -1  # owned by the stream now
                        nursery.start_soon(terminal.pump, stream)
                        async with run_cli(
                            "pipe", "--app", "ttyapp", "--format", "json", "--relay", relay.agent, stdin=True
                        ) as pipe:
                            await pipe.write(lines[0] + "\n")
                            await terminal.wait_count(1, "the first record")
                            await pipe.write(lines[1] + "\n" + lines[2] + "\n")
                            await pipe.close_stdin()
                            assert await pipe.wait() == 0, pipe.describe()
                        assert await tail.wait() == 0, tail.describe()
                        await terminal.wait_eof()
            finally:
                for fd in (master, slave):
                    if fd >= 0:
                        os.close(fd)

    shown = [line.rstrip("\r") for line in terminal.lines if line.strip("\r")]
    assert len(shown) == 3, terminal.text
    assert shown[0].startswith("\x1b[33m") and shown[0].endswith("careful\x1b[0m"), shown
    assert not has_ansi(shown[1]) and shown[1].endswith("fine"), shown
    assert shown[2].startswith("\x1b[31m") and shown[2].endswith("broken\x1b[0m"), shown


# -- 5. error paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["tail", "x", "--relay", "127.0.0.1:1"], id="tail"),
        pytest.param(["sessions", "--relay", "127.0.0.1:1"], id="sessions"),
        pytest.param(["pipe", "--app", "x", "--relay", "127.0.0.1:1"], id="pipe"),
    ],
)
async def test_unreachable_relay_is_one_line_error(args: list[str]) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        result = await run_once(*args)
    line = assert_cli_error(result, 1)
    assert line.startswith("loupelive: cannot reach 127.0.0.1:1"), line


@pytest.mark.parametrize(
    "relay_arg",
    ["127.0.0.1:http", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-5", "[::1", "[::1]x"],
)
async def test_bad_relay_address_is_a_usage_error(relay_arg: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        result = await run_once("tail", "x", f"--relay={relay_arg}")
    line = assert_cli_error(result, 2)
    assert repr(relay_arg) in line, line


@pytest.mark.parametrize("level", ["loud", "warnings", "-1"])
async def test_bad_level_is_a_usage_error(level: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        # The relay address is unreachable: the level must be refused before any connection.
        result = await run_once("tail", "x", "--relay", "127.0.0.1:1", f"--level={level}")
    line = assert_cli_error(result, 2)
    assert "not a log level" in line, line


async def test_unknown_or_ambiguous_session_without_wait_is_one_line_error(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            result = await run_once("tail", "nosuch", "--relay", relay.viewer)
            line = assert_cli_error(result, 1)
            assert line == "loupelive: no live session matches 'nosuch'"

            async with (
                run_cli("pipe", "--app", "twin", "--relay", relay.agent, stdin=True) as one,
                run_cli("pipe", "--app", "twin", "--relay", relay.agent, stdin=True) as two,
            ):
                ids = {await pipe_session_id(one, "twin"), await pipe_session_id(two, "twin")}
                result = await run_once("tail", "twin", "--relay", relay.viewer)
                line = assert_cli_error(result, 1)
                assert line.startswith("loupelive: 'twin' matches 2 sessions: "), line
                assert all(session_id in line for session_id in ids), line
            assert_no_traceback(relay.child.stderr.text)


@pytest.mark.parametrize("taken", ["agent", "viewer"])
async def test_serve_on_a_port_in_use_is_one_line_error(tmp_path: Path, taken: str) -> None:
    second_ready = tmp_path / "second-ready.json"
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            ports = {"agent": "0", "viewer": "0"}
            ports[taken] = str(relay.agent_port if taken == "agent" else relay.viewer_port)
            result = await run_once(
                "serve",
                "--agent-port",
                ports["agent"],
                "--viewer-port",
                ports["viewer"],
                "--ready-file",
                str(second_ready),
            )
            # The first relay is unharmed.
            listed = await run_once("sessions", "--relay", relay.viewer)
            assert listed.returncode == 0, str(listed)
    assert not second_ready.exists()
    line = assert_cli_error(result, 1)
    assert "cannot listen" in line, line


# -- 6. an HTTP client on a relay port ------------------------------------------------------


@pytest.mark.parametrize("port_name", ["viewer", "agent"])
async def test_http_request_gets_a_400_and_the_relay_keeps_serving(tmp_path: Path, port_name: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            port = relay.viewer_port if port_name == "viewer" else relay.agent_port
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                chunks = []
                while chunk := await stream.receive_some(65536):  # b"": the relay closed
                    chunks.append(chunk)
            reply = b"".join(chunks)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), reply
            assert b"\r\nConnection: close" in head, reply
            length = re.search(rb"\r\nContent-Length: (\d+)", head)
            assert length is not None and int(length[1]) == len(body), reply
            assert b"loupelive" in body, reply
            assert f"for {port_name}s".encode() in body, reply

            listed = await run_once("sessions", "--relay", relay.viewer)
            assert (listed.returncode, listed.stdout) == (0, "no live sessions\n"), str(listed)
            await relay.child.stderr.wait_for_line(r"HTTP request on a loupelive port")
            assert relay.child.returncode is None
            assert_no_traceback(relay.child.stderr.text)


# -- 7. serve shutdown -------------------------------------------------------------------------


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
async def test_serve_exits_cleanly_on_signal(tmp_path: Path, signame: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            relay.child.send_signal(SIGNALS[signame])
            assert await relay.child.wait() == 0, relay.child.describe()
    stderr = relay.child.stderr.text
    assert_no_traceback(stderr)
    assert f"received {signame}, shutting down" in stderr, stderr


async def test_serve_exits_cleanly_on_sigterm_with_live_clients(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            async with (
                run_cli("pipe", "--app", "busy", "--relay", relay.agent, stdin=True) as pipe,
                run_cli(
                    "tail", "busy", "--relay", relay.viewer, "--wait", "--format", "json", "--history", "10"
                ) as tail,
            ):
                await pipe_session_id(pipe, "busy")
                await pipe.write("before shutdown\n")
                await tail.stdout.wait_count(1, "the first record")
                relay.child.send_signal(signal.SIGTERM)
                assert await relay.child.wait() == 0, relay.child.describe()
                # Agent and viewer keep trying to reconnect, without a traceback.
                assert pipe.returncode is None
                assert tail.returncode is None
                assert json.loads(tail.stdout.lines[0])["message"] == "before shutdown"
    assert_no_traceback(relay.child.stderr.text)


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
async def test_relay_restart_loses_and_duplicates_nothing(tmp_path: Path, kill: signal.Signals) -> None:
    """A relay killed mid-stream and started again on the same ports: agent and
    viewer reconnect by themselves, and the viewer sees every line once, in order."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    lines = [f"line {i}" for i in range(30)]
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path / "first") as first:
            ports = ("--agent-port", str(first.agent_port), "--viewer-port", str(first.viewer_port))
            async with (
                run_cli("pipe", "--app", "phoenix", "--relay", first.agent, stdin=True) as pipe,
                run_cli(
                    "tail",
                    "phoenix",
                    "--relay",
                    first.viewer,
                    "--wait",
                    "--format",
                    "json",
                    "--history",
                    "100",
                ) as tail,
            ):
                await pipe_session_id(pipe, "phoenix")
                for line in lines[:10]:
                    await pipe.write(line + "\n")
                await tail.stdout.wait_count(10, "the records before the restart")
                first.child.send_signal(kill)
                await first.child.wait()
                # Logged while there is no relay: kept in the agent's buffer.
                for line in lines[10:20]:
                    await pipe.write(line + "\n")
                async with start_relay(tmp_path / "second", *ports) as second:
                    await tail.stdout.wait_count(20, "the records logged while the relay was down")
                    for line in lines[20:]:
                        await pipe.write(line + "\n")
                    await tail.stdout.wait_count(30, "the records after the restart")
                    await pipe.close_stdin()
                    assert await pipe.wait() == 0, pipe.describe()
                    assert await tail.wait() == 0, tail.describe()
                    assert_no_traceback(second.child.stderr.text)
            objects = json_lines(tail.stdout.lines)
            records = [o for o in objects if o["type"] == "record"]
            assert [o["message"] for o in records] == lines, tail.describe()
            assert [o["seq"] for o in records] == list(range(1, 31))
            assert [o["type"] for o in objects if o["type"] != "record"] == ["session_ended"]
            assert_no_traceback(tail.stderr.text)
            assert_no_traceback(pipe.stderr.text)
            if kill == signal.SIGTERM:
                # A graceful shutdown tells viewers and agents it is going away.
                assert "shutting down" in tail.stderr.text, tail.describe()
                assert "shutting down" in pipe.stderr.text, pipe.describe()


# -- 8. serve --demo ----------------------------------------------------------------------------


async def test_serve_demo_feeds_a_tail(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path, "--demo") as relay:
            match = await relay.child.stderr.wait_for_line(
                r"demo agent running: session (\S+) \(app demo-shop\)", "the demo agent's log line"
            )
            async with run_cli(
                "tail", "demo-shop", "--relay", relay.viewer, "--wait", "--format", "json"
            ) as tail:
                lines = await tail.stdout.wait_count(3, "three demo records")
                tail.send_signal(signal.SIGINT)
                code = await tail.wait()
            records = json_lines(lines)
            assert [r["type"] for r in records] == ["record"] * 3
            seqs = [r["seq"] for r in records]
            assert seqs == sorted(set(seqs)), seqs
            for record in records:
                assert str(record["logger"]).startswith("shop."), record
                assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR"}
                assert record["message"]
            listed = await run_once("sessions", "--relay", relay.viewer, "--format", "json")
            (demo,) = json.loads(listed.stdout)
            assert demo["session_id"] == match[1]
            assert demo["app"] == "demo-shop"
            assert demo["tags"] == {"demo": "true"}
            assert demo["pid"] == relay.child.pid
            # Ctrl-C on tail: the conventional 130, quietly.
            assert code == 130, tail.describe()
            assert_no_traceback(tail.stderr.text)
            assert tail.stderr.text == "", tail.describe()
            assert_no_traceback(relay.child.stderr.text)


# -- more behaviour of tail ------------------------------------------------------------------


async def test_tail_ends_with_agent_lost_when_the_agent_dies(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        # A short grace: the session ends soon after its agent is gone for good.
        async with start_relay(tmp_path, "--agent-grace", "0.5") as relay:
            async with run_cli(
                "tail", "doomed", "--relay", relay.viewer, "--wait", "--format", "json", "--history", "10"
            ) as tail:
                async with run_cli("pipe", "--app", "doomed", "--relay", relay.agent, stdin=True) as pipe:
                    session_id = await pipe_session_id(pipe, "doomed")
                    await pipe.write("last words\n")
                    await tail.stdout.wait_count(1, "the record")
                    pipe.send_signal(signal.SIGKILL)
                    await pipe.wait()
                assert await tail.wait() == 0, tail.describe()
            objects = json_lines(tail.stdout.lines)
            # A killed agent: first "disconnected" (the relay waits its grace
            # period for it), then the end, as "crashed".
            assert [o["type"] for o in objects] == ["record", "session_status", "session_ended"], (
                tail.describe()
            )
            assert objects[0]["message"] == "last words"
            assert objects[1] == {
                "type": "session_status",
                "session_id": session_id,
                "status": "disconnected",
                "was": "running",
            }
            assert objects[2] == {
                "type": "session_ended",
                "session_id": session_id,
                "reason": "agent_lost",
                "status": "crashed",
            }
            assert tail.stderr.text == "", tail.describe()
            assert_no_traceback(relay.child.stderr.text)


async def test_tail_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """``loupelive tail ... | head -1``: the reader leaving is not an error."""
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            async with run_cli(
                "tail", "headed", "--relay", relay.viewer, "--wait", "--format", "json", "--history", "10"
            ) as tail:
                async with run_cli("pipe", "--app", "headed", "--relay", relay.agent, stdin=True) as pipe:
                    await pipe_session_id(pipe, "headed")
                    await pipe.write("one\n")
                    await tail.stdout.wait_count(1, "the first record")
                    await tail.close_stdout()
                    await pipe.write("two\nthree\n")
                    assert await tail.wait() == 0, tail.describe()
                    await pipe.close_stdin()
                    assert await pipe.wait() == 0, pipe.describe()
            assert tail.stderr.text == "", tail.describe()


async def test_version() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        result = await run_once("--version")
    assert result.returncode == 0, str(result)
    assert re.fullmatch(r"loupelive \d+\.\d+\.\d+\S*\n", result.stdout), str(result)


async def test_serve_logs_json_lines(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with run_cli(
            "--log-format", "json", "serve", "--agent-port", "0", "--viewer-port", "0"
        ) as child:
            line = await child.stderr.wait_for_line(r"relay listening", "the listening log line")
            record = json.loads(line.string)
            assert record["level"] == "INFO"
            assert record["logger"] == "loupelive.relay"
            assert record["message"].startswith("relay listening on 127.0.0.1")
            child.send_signal(signal.SIGTERM)
            assert await child.wait() == 0


async def test_stats_reports_exactly_what_went_through(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with start_relay(tmp_path) as relay:
            async with (
                run_cli(
                    "tail",
                    "counted",
                    "--relay",
                    relay.viewer,
                    "--wait",
                    "--format",
                    "json",
                    "--history",
                    "100",
                ) as tail,
                run_cli("pipe", "--app", "counted", "--relay", relay.agent, stdin=True) as pipe,
            ):
                await pipe_session_id(pipe, "counted")
                # Lines logged before the stream is up arrive as history: each
                # record reaches the relay exactly once either way.
                for i in range(25):
                    await pipe.write(f"line {i}\n")
                await tail.stdout.wait_count(25, "the 25 records")
                result = await run_once("stats", "--relay", relay.viewer, "--format", "json")
                assert result.returncode == 0, result
                stats = json.loads(result.stdout)
                assert stats["records_in"] == 25
                assert stats["sessions"] == 1
                assert stats["streaming_sessions"] == 1
                assert stats["viewer_streams"] == 1
                assert stats["rejected"] == {}
                text = await run_once("stats", "--relay", relay.viewer)
                assert "records in          25" in text.stdout
                await pipe.close_stdin()
                assert await pipe.wait() == 0

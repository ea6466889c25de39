"""The terminal faces: ``tail`` over many sessions (``--all``, ``--app``), its
client-side filters (``--grep``, ``--since``), and ``sessions`` / ``sessions
--watch`` when stdout is not a terminal.

The relay and the agents run in this process (loopback TCP, the ``relay``
fixture; agents with ``open_agent``); the commands are real ``python -m
loupelive`` subprocesses (see :mod:`tests.cli_helpers`).  Tests wait on the
commands' output or on the relay's state, never on time.
"""

from __future__ import annotations

import json
import re
import socket

import attrs
import pytest
import trio

import loupelive
from loupelive import Level
from loupelive.messages import Accept, Hello, Role

from .cli_helpers import (
    assert_cli_error,
    assert_no_traceback,
    has_ansi,
    json_lines,
    run_cli,
    run_once,
)
from .conftest import TEST_TIMEOUT, open_raw, wait_until
from .test_parity import wait_counts

#: A record line of ``tail`` in text mode, following several sessions: the
#: session label, then the line of a single-session tail.
LABELLED = re.compile(
    r"^(?P<app>[^\s:]+):(?P<short>[0-9a-f]{8}) \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +"
    r"(?P<logger>\S+) \[(?P<thread>[^\]]*)\] (?P<message>.*)$"
)


def viewer_address(relay: loupelive.Relay) -> str:
    return f"127.0.0.1:{relay.viewer_port}"


def records_by_session(objects: list[dict[str, object]]) -> dict[str, list[str]]:
    """The messages of the record objects of a JSON tail, per session_id, in order."""
    by_session: dict[str, list[str]] = {}
    for obj in objects:
        if obj["type"] == "record":
            by_session.setdefault(str(obj["session_id"]), []).append(str(obj["message"]))
    return by_session


def count_records(lines: list[str]) -> int:
    return sum(1 for line in lines if json.loads(line)["type"] == "record")


@attrs.define
class BackgroundAgent:
    """An agent (``open_agent``) in a task of its own, so a test can end its session at any point."""

    agent: loupelive.Agent
    _stop: trio.Event
    _done: trio.Event

    @property
    def session_id(self) -> str:
        return self.agent.session_id

    async def close(self) -> None:
        """Leave the agent's block (GOODBYE: the session ends) and wait until it is done."""
        self._stop.set()
        await self._done.wait()


async def start_agent(nursery: trio.Nursery, relay: loupelive.Relay, app: str) -> BackgroundAgent:
    stop, done = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[BackgroundAgent]) -> None:
        try:
            async with loupelive.open_agent("127.0.0.1", relay.agent_port, app=app) as agent:
                task_status.started(BackgroundAgent(agent, stop, done))
                await stop.wait()
        finally:
            done.set()

    return await nursery.start(run)  # type: ignore[no-any-return]


def log_some(agent: loupelive.Agent, name: str, count: int, start: int = 0) -> list[str]:
    messages = [f"{name} record {i}" for i in range(start, start + count)]
    for message in messages:
        agent.log(Level.INFO, message, logger=name.split("-")[0], thread="main")
    return messages


# -- 9. tail --all --------------------------------------------------------------------------


async def test_tail_all_follows_every_session_now_and_later_with_labels(
    relay: loupelive.Relay, nursery: trio.Nursery
) -> None:
    port = relay.agent_port
    expected: dict[str, list[str]] = {}
    apps: dict[str, str] = {}
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", port, app="web-shop") as b,
            loupelive.open_agent("127.0.0.1", port, app="billing") as c,
        ):
            a = await start_agent(nursery, relay, "web-shop")
            for agent, name in ((a.agent, "web-a"), (b, "web-b"), (c, "billing-c")):
                expected[agent.session_id] = log_some(agent, name, 3)
                apps[agent.session_id] = agent.info.app
            common = ("tail", "--all", "--relay", viewer_address(relay), "--history", "100")
            async with (
                run_cli(*common, "--format", "json") as as_json,
                run_cli(*common) as as_text,
            ):
                await as_json.stdout.wait_for(lambda ls: count_records(ls) >= 9, "the first 9 records")
                await as_text.stdout.wait_count(9, "the first 9 lines")
                # A session that starts after tail did is followed too.
                async with loupelive.open_agent("127.0.0.1", port, app="billing") as d:
                    apps[d.session_id] = "billing"
                    expected[d.session_id] = log_some(d, "billing-d", 2)
                    await as_json.stdout.wait_for(
                        lambda ls: count_records(ls) >= 11, "the late session's records"
                    )
                    await as_text.stdout.wait_count(11, "the late session's lines")
                    # One session ends: shown inline, the others go on.
                    await a.close()
                    end_text = f"--- session {a.session_id} ended (session_ended) ---"
                    await as_json.stdout.wait_for_line(r'"type": "session_ended"', "the end of a session")
                    await as_text.stdout.wait_for_line(re.escape(end_text), "the end of a session")
                    expected[b.session_id] += log_some(b, "web-b", 1, start=3)
                    await as_json.stdout.wait_for(lambda ls: count_records(ls) >= 12, "one more record")
                    await as_text.stdout.wait_for_line(r"web-b record 3$", "one more line")
                d_end = f"--- session {d.session_id} ended (session_ended) ---"
                await as_json.stdout.wait_for_line(d.session_id + r'", "reason"', "the late session's end")
                await as_text.stdout.wait_for_line(re.escape(d_end), "the late session's end")
                assert as_json.returncode is None and as_text.returncode is None

    # JSON: every record of every session, each with its session_id, in seq order.
    objects = json_lines(as_json.stdout.lines)
    assert records_by_session(objects) == expected, as_json.describe()
    for sid in expected:
        seqs = [o["seq"] for o in objects if o["type"] == "record" and o["session_id"] == sid]
        assert seqs == list(range(1, len(seqs) + 1))
    ends = [o for o in objects if o["type"] != "record"]
    assert ends == [
        {"type": "session_ended", "session_id": sid, "reason": "session_ended", "status": "ended"}
        for sid in (a.session_id, d.session_id)
    ], as_json.describe()
    end_at = objects.index(ends[0])
    assert all(o["session_id"] != a.session_id for o in objects[end_at + 1 :])

    # Text: every line labelled app:<first 8 of the session id>.
    by_label: dict[str, list[str]] = {}
    for line in as_text.stdout.lines:
        if "--- session " in line:
            continue
        match = LABELLED.match(line)
        assert match, line
        by_label.setdefault(f"{match['app']}:{match['short']}", []).append(match["message"])
    assert by_label == {f"{apps[sid]}:{sid[:8]}": messages for sid, messages in expected.items()}
    end_lines = [line for line in as_text.stdout.lines if "--- session " in line]
    assert end_lines == [f"web-shop:{a.session_id[:8]} {end_text}", f"billing:{d.session_id[:8]} {d_end}"]
    assert not has_ansi(as_text.stdout.text)
    assert as_text.stderr.lines == ["loupelive: following every session"], as_text.describe()
    assert_no_traceback(as_json.stderr.text)


# -- 10. tail --app GLOB --------------------------------------------------------------------


async def test_tail_app_glob_follows_only_matching_apps(relay: loupelive.Relay) -> None:
    port = relay.agent_port
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_agent("127.0.0.1", port, app="web-shop") as shop,
            loupelive.open_agent("127.0.0.1", port, app="web-admin") as admin,
            loupelive.open_agent("127.0.0.1", port, app="billing") as billing,
            loupelive.open_agent("127.0.0.1", port, app="my-web-app") as lookalike,
        ):
            expected = {
                shop.session_id: log_some(shop, "web-shop", 2),
                admin.session_id: log_some(admin, "web-admin", 2),
            }
            log_some(billing, "billing", 2)
            log_some(lookalike, "my-web-app", 2)
            async with run_cli(
                "tail",
                "--app",
                "web-*",
                "--relay",
                viewer_address(relay),
                "--history",
                "100",
                "--format",
                "json",
            ) as tail:
                await tail.stdout.wait_for(lambda ls: count_records(ls) >= 4, "the web records")
                # Sessions that start later: one of another app (logs and ends
                # first), then one that matches.
                async with loupelive.open_agent("127.0.0.1", port, app="billing") as late_billing:
                    log_some(late_billing, "billing-late", 2)
                async with loupelive.open_agent("127.0.0.1", port, app="web-late") as late_web:
                    expected[late_web.session_id] = log_some(late_web, "web-late", 2)
                    await tail.stdout.wait_for(lambda ls: count_records(ls) >= 6, "the late web records")
                late_end = await tail.stdout.wait_for_line(
                    rf'"type": "session_ended", "session_id": "{late_web.session_id}"',
                    "the late web session's end",
                )
                assert late_end
                assert tail.returncode is None

    objects = json_lines(tail.stdout.lines)
    assert records_by_session(objects) == expected, tail.describe()
    shown = {str(o["session_id"]) for o in objects}
    assert shown == set(expected), tail.describe()
    assert not shown & {billing.session_id, lookalike.session_id, late_billing.session_id}
    assert_no_traceback(tail.stderr.text)


# -- 11. --grep ---------------------------------------------------------------------------------


async def test_tail_grep_filters_message_logger_thread_exception_and_fields(
    relay: loupelive.Relay, nursery: trio.Nursery
) -> None:
    records = [
        # (level, logger, thread, message, exception, fields, matches)
        (Level.ERROR, "shop.pay", "main", "payment FAILED for order 7", None, {}, True),
        (Level.INFO, "shop.failover", "main", "switching database", None, {}, True),
        (Level.INFO, "shop.ok", "main", "all good", None, {"status": "ok"}, False),
        (Level.ERROR, "shop.pay", "main", "boom", "Traceback\nValueError: Failure in step 3", {}, True),
        (Level.INFO, "shop.check", "main", "checked", None, {"result": "fail"}, True),
        (Level.INFO, "shop", "Failing-Worker", "from a worker", None, {}, True),
        (Level.WARNING, "shop", "main", "nothing to see", None, {"path": "/cart"}, False),
        (Level.INFO, "shop", "main", "the last FaIlUrE", None, {}, True),
    ]
    with trio.fail_after(TEST_TIMEOUT):
        session = await start_agent(nursery, relay, "grepped")
        agent = session.agent
        for level, logger, thread, message, exception, fields, _ in records:
            agent.log(level, message, logger=logger, thread=thread, exception=exception, fields=fields)
        async with (
            run_cli(
                "tail",
                agent.session_id,
                "--relay",
                viewer_address(relay),
                "--history",
                "100",
                "--format",
                "json",
                "--grep",
                "fail",
            ) as as_json,
            run_cli(
                "tail",
                agent.session_id,
                "--relay",
                viewer_address(relay),
                "--history",
                "100",
                "--grep",
                "FAIL",
            ) as as_text,
        ):
            wanted = sum(1 for *_, matches in records if matches)
            await as_json.stdout.wait_count(wanted, "the matching records")
            await as_text.stdout.wait_for_line("the last FaIlUrE", "the last matching line")
            # The session ends: both exit.
            await session.close()
            assert await as_json.wait() == 0, as_json.describe()
            assert await as_text.wait() == 0, as_text.describe()

    objects = json_lines(as_json.stdout.lines)
    assert objects[-1]["type"] == "session_ended"
    printed = objects[:-1]
    expected_seqs = [seq for seq, (*_, matches) in enumerate(records, 1) if matches]
    assert [o["seq"] for o in printed] == expected_seqs, as_json.describe()
    assert [o["message"] for o in printed] == [r[3] for r in records if r[-1]]
    # Text mode filters the same way (the exception's lines follow its record).
    text = as_text.stdout.text
    for _, _, _, message, _, _, matches in records:
        assert (message in text) == matches, (message, text)
    assert "ValueError: Failure in step 3" in text
    assert_no_traceback(as_text.stderr.text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--all", "--grep", "(unclosed"), "--grep: not a valid regular expression"),
        (("some-app", "--grep", "[a-"), "--grep: not a valid regular expression"),
        (("--all", "--since", "3"), "--since needs one SESSION"),
        (("--app", "web-*", "--since", "3"), "--since needs one SESSION"),
        (("--all", "--app", "web-*"), "name exactly one of"),
        ((), "name exactly one of"),
    ],
)
async def test_tail_usage_errors(args: tuple[str, ...], message: str) -> None:
    # Nothing listens on port 1: the arguments are refused before any connection.
    with trio.fail_after(TEST_TIMEOUT):
        result = await run_once("tail", *args, "--relay", "127.0.0.1:1")
    line = assert_cli_error(result, 2)
    assert line.startswith(f"loupelive: {message}"), line


# -- 12. --since ----------------------------------------------------------------------------


async def test_tail_since_resumes_after_the_given_seq(relay: loupelive.Relay, nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        session = await start_agent(nursery, relay, "resumed")
        agent = session.agent
        log_some(agent, "resumed", 10)
        since = (
            "tail",
            agent.session_id,
            "--relay",
            viewer_address(relay),
            "--format",
            "json",
            "--since",
        )
        async with (
            run_cli(*since, "6") as after_six,
            run_cli(*since, "0") as from_start,
        ):
            await after_six.stdout.wait_count(4, "the records after seq 6")
            await from_start.stdout.wait_count(10, "every record")
            await wait_until(lambda: agent.statistics().viewers == 2)
            log_some(agent, "resumed", 2, start=10)
            await after_six.stdout.wait_count(6, "the live records")
            await from_start.stdout.wait_count(12, "the live records")
            await session.close()
            assert await after_six.wait() == 0, after_six.describe()
            assert await from_start.wait() == 0, from_start.describe()
    for tail, first in ((after_six, 7), (from_start, 1)):
        objects = json_lines(tail.stdout.lines)
        assert [o["type"] for o in objects] == ["record"] * (13 - first) + ["session_ended"], tail.describe()
        assert [o["seq"] for o in objects[:-1]] == list(range(first, 13))
        assert [o["message"] for o in objects[:-1]] == [f"resumed record {i}" for i in range(first - 1, 12)]


async def test_tail_since_beyond_the_last_seq_shows_only_later_records(
    relay: loupelive.Relay, nursery: trio.Nursery
) -> None:
    """``--since SEQ`` prints records after SEQ only, also when the session has
    not reached SEQ yet (a resume from a mistaken or future seq)."""
    with trio.fail_after(TEST_TIMEOUT):
        session = await start_agent(nursery, relay, "ahead")
        agent = session.agent
        log_some(agent, "ahead", 3)
        async with run_cli(
            "tail", agent.session_id, "--relay", viewer_address(relay), "--format", "json", "--since", "5"
        ) as tail:
            await wait_until(lambda: agent.statistics().viewers == 1 and agent.statistics().streaming)
            log_some(agent, "ahead", 4, start=3)  # seqs 4..7
            await session.close()
            assert await tail.wait() == 0, tail.describe()
    objects = json_lines(tail.stdout.lines)
    assert [o.get("seq") for o in objects] == [6, 7, None], tail.describe()
    assert objects[-1]["type"] == "session_ended"


# -- 13. sessions and sessions --watch --------------------------------------------------------


async def test_sessions_table_shows_status_and_flags_errors(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="erring", environment="qa") as erring,
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="quiet") as quiet,
        ):
            for level in (Level.ERROR, Level.CRITICAL, Level.WARNING, Level.INFO, Level.ERROR):
                erring.log(level, "something")
            quiet.log(Level.WARNING, "only a warning")
            await wait_counts(viewer, erring.session_id, 5)
            await wait_counts(viewer, quiet.session_id, 1)
            table = await run_once("sessions", "--relay", viewer_address(relay))
    assert table.returncode == 0, str(table)
    assert not has_ansi(table.stdout)
    header, *rows = table.stdout.splitlines()
    assert header.split()[8:12] == ["STATUS", "RECORDS", "ERRORS", "WARNINGS"]
    cells = {row.split()[1]: row.split() for row in rows}
    assert set(cells) == {"erring", "quiet"}
    assert cells["erring"][0] == erring.session_id and cells["erring"][3] == "qa"
    # STATUS RECORDS ERRORS WARNINGS REC/S VIEWERS STREAMING
    assert cells["erring"][-7:] == ["running", "5", "3!", "1", "-", "0", "no"]
    assert cells["quiet"][-7:] == ["running", "1", "0", "1", "-", "0", "no"]


async def test_sessions_watch_prints_plain_lines_and_json_events_when_not_a_terminal(
    relay: loupelive.Relay,
) -> None:
    address = viewer_address(relay)
    host = socket.gethostname()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="erring") as erring,
        ):
            erring.log(Level.ERROR, "bad")
            erring.log(Level.INFO, "fine")
            await wait_counts(viewer, erring.session_id, 2)
            async with (
                run_cli("sessions", "--watch", "--relay", address) as text,
                run_cli("sessions", "--watch", "--relay", address, "--format", "json") as as_json,
            ):
                header, row = await text.stdout.wait_count(2, "the initial table")
                [initial] = json_lines(await as_json.stdout.wait_count(1, "the initial list"))
                assert header.split()[0] == "SESSION"
                assert row.split()[0] == erring.session_id
                assert row.split()[-7:] == ["running", "2", "1!", "0", "-", "0", "no"]
                assert [(s["session_id"], s["errors"], s["status"]) for s in initial] == [
                    (erring.session_id, 1, "running")
                ]

                # Added, counts, changed (a viewer), ended.
                async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="newcomer") as new:
                    n = new.session_id
                    await text.stdout.wait_for_line(rf"^\+ added   {n} app=newcomer", "the 'added' line")
                    for level in (Level.ERROR, Level.CRITICAL, Level.WARNING, Level.INFO):
                        new.log(level, "news")
                    counts = rf"^# counts   {n} records=4 errors=2 warnings=1$"
                    await text.stdout.wait_for_line(counts, "the 'counts' line")
                    async with viewer.open_stream(n):
                        await text.stdout.wait_for_line(rf"^~ changed {n} .* viewers=1 ", "a viewer joined")
                await text.stdout.wait_for_line(rf"^- ended    {n} \(session_ended\)$", "the 'ended' line")

                # A session whose agent vanishes (the relay's grace is 0 here).
                peer = await open_raw(relay.agent_port)
                info = loupelive.SessionInfo(app="vanishing", host=host, pid=4242)
                assert isinstance(await peer.handshake(Hello(role=Role.AGENT_CONTROL, session=info)), Accept)
                r = info.session_id
                await text.stdout.wait_for_line(rf"^\+ added   {r} app=vanishing host={host} pid=4242 ")
                await peer.stream.aclose()
                await text.stdout.wait_for_line(rf"^- crashed  {r} \(agent_lost\)$", "the 'crashed' line")
                await as_json.stdout.wait_for_line(rf'"session_id": "{r}", "reason": "agent_lost"')
                assert text.returncode is None and as_json.returncode is None

    lines = text.stdout.lines[2:]
    assert all(line[:2] in ("+ ", "~ ", "# ", "- ") for line in lines), text.describe()
    mine = [line for line in lines if n in line]
    kinds = [line.split()[1] for line in mine]
    assert kinds[0] == "added" and kinds[-1] == "ended", mine
    assert "counts" in kinds and "changed" in kinds, mine
    assert any(re.search(rf"^~ changed {r} .* status=disconnected ", line) for line in lines), lines
    assert not has_ansi(text.stdout.text)

    events = json_lines(as_json.stdout.lines[1:])
    assert {e["type"] for e in events} == {"added", "changed", "counts", "ended"}, as_json.describe()
    about_n = [e for e in events if n in json.dumps(e)]
    assert about_n[0]["type"] == "added" and about_n[0]["session"]["app"] == "newcomer"
    counted = [
        entry for e in about_n if e["type"] == "counts" for entry in e["counts"] if entry["session_id"] == n
    ]
    assert counted and (counted[-1]["records"], counted[-1]["errors"], counted[-1]["critical"]) == (4, 1, 1)
    assert about_n[-1] == {"type": "ended", "session_id": n, "reason": "session_ended", "status": "ended"}
    about_r = [e for e in events if r in json.dumps(e)]
    assert [e["type"] for e in about_r] == ["added", "changed", "ended"], about_r
    assert about_r[1]["session"]["status"] == "disconnected"
    assert about_r[-1] == {"type": "ended", "session_id": r, "reason": "agent_lost", "status": "crashed"}
    assert_no_traceback(text.stderr.text + as_json.stderr.text)

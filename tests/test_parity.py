"""Loupe parity: what the session list shows without a stream (status, counters,
clock) and where each record came from.

A relay in this process (loopback TCP, or in-memory streams under an autojump
clock for the update-rate test), real agents (in this process, behind a TCP
proxy, or a ``loupelive pipe`` subprocess) and real viewers.  Nothing waits on
time: tests wait on the viewer's session list (``wait_sessions``), on its
session events (:class:`EventLog`), on the relay's state (``wait_until``) or
on a child's output, always under ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import getpass
import inspect
import io
import itertools
import json
import os
import platform
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio
import trio.testing

import loupelive
from loupelive import Level, Record, SessionAdded, SessionChanged, SessionEnded
from loupelive.messages import SessionCounts, SessionInfo
from loupelive.relay import LIST_UPDATE_INTERVAL
from loupelive.term import TailOptions, TailPrinter
from loupelive.viewer import SessionEvent, SessionEvents

from .cli_helpers import assert_no_traceback, child_env, json_lines, run_cli
from .conftest import TEST_TIMEOUT, collect, test_config, wait_until
from .test_cli import pipe_session_id
from .test_handler import AgentProxy, close_handler, live_handler, unique

# -- helpers -----------------------------------------------------------------------------


@attrs.define
class EventLog:
    """A viewer's session events, collected in the background with their (Trio) arrival times."""

    events: list[SessionEvent] = attrs.Factory(list)
    times: list[float] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def run(self, events: SessionEvents) -> None:
        async with contextlib.aclosing(events):
            async for event in events:
                self.events.append(event)
                self.times.append(trio.current_time())
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[SessionEvent], bool], *, start: int = 0) -> int:
        """The index of the first event from ``start`` on that ``predicate`` accepts."""
        index = start
        while True:
            while index < len(self.events):
                if predicate(self.events[index]):
                    return index
                index += 1
            await self._changed.wait()

    def about(self, session_id: str, start: int = 0) -> list[SessionEvent]:
        """The events from ``start`` on that concern ``session_id``."""
        return [event for event in self.events[start:] if concerns(event, session_id)]


def concerns(event: SessionEvent, session_id: str) -> bool:
    if isinstance(event, SessionCounts):
        return any(entry.session_id == session_id for entry in event.counts)
    if isinstance(event, SessionEnded):
        return event.session_id == session_id
    return event.session.session_id == session_id


def is_status(session_id: str, status: str) -> Callable[[SessionEvent], bool]:
    def check(event: SessionEvent) -> bool:
        return isinstance(event, SessionChanged | SessionAdded) and (
            event.session.session_id,
            event.session.status,
        ) == (session_id, status)

    return check


def is_end(session_id: str) -> Callable[[SessionEvent], bool]:
    return lambda event: isinstance(event, SessionEnded) and event.session_id == session_id


@contextlib.asynccontextmanager
async def event_log(viewer: loupelive.Viewer) -> AsyncIterator[EventLog]:
    """Collect ``viewer``'s session events from now on, for the block."""
    log = EventLog()
    events = viewer.session_events()  # buffered from this call on
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run, events)
        yield log
        nursery.cancel_scope.cancel()


def counts_of(info: SessionInfo) -> tuple[int, int, int, int, float]:
    return (info.records, info.warnings, info.errors, info.critical, info.last_record_at)


async def wait_counts(
    viewer: loupelive.Viewer, session_id: str, expected: tuple[int, int, int, int, float] | int
) -> SessionInfo:
    """Wait until the viewer's list shows ``expected`` counts (or that many records) for the session."""

    def shown(sessions: list[SessionInfo]) -> bool:
        info = viewer.session(session_id)
        if info is None:
            return False
        if isinstance(expected, int):
            return info.records == expected
        return counts_of(info) == expected

    await viewer.wait_sessions(shown)
    info = viewer.session(session_id)
    assert info is not None
    return info


#: 3 WARNING, 2 ERROR, 1 CRITICAL, 4 INFO, interleaved.
LEVELS = [
    Level.INFO,
    Level.WARNING,
    Level.ERROR,
    Level.INFO,
    Level.CRITICAL,
    Level.WARNING,
    Level.INFO,
    Level.ERROR,
    Level.WARNING,
    Level.INFO,
]
STAMPS = [1_700_000_000.125 + 0.5 * i for i in range(len(LEVELS))]


def log_levels(agent: loupelive.Agent) -> None:
    for i, (level, stamp) in enumerate(zip(LEVELS, STAMPS, strict=True)):
        agent.log(level, f"record {i}", logger="parity", timestamp=stamp)


EXPECTED = (10, 3, 2, 1, STAMPS[-1])


# -- 1. counters and status across a normal end --------------------------------------------


async def test_counts_reach_the_list_without_a_stream_and_the_end_is_ended(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            event_log(viewer) as log,
        ):
            async with loupelive.open_agent(
                "127.0.0.1", relay.agent_port, app="counted", app_version="3.1", environment="staging"
            ) as agent:
                sid = agent.session_id
                added = log.events[await log.wait_for(lambda e: isinstance(e, SessionAdded))]
                assert isinstance(added, SessionAdded)
                info = added.session
                # The agent's registration, with the new fields.
                host = socket.gethostname()
                assert info.session_id == sid
                assert (info.app, info.app_version, info.environment) == ("counted", "3.1", "staging")
                assert info.host == host
                assert info.domain == (host.partition(".")[2] or os.environ.get("USERDOMAIN", ""))
                assert info.os == f"{platform.system()} {platform.release()}".strip()
                assert info.runtime == f"{platform.python_implementation()} {platform.python_version()}"
                assert info.agent_version == f"loupelive {loupelive.__version__}"
                assert info.user == getpass.getuser()
                assert (info.status, info.records, info.errors, info.last_record_at) == ("running", 0, 0, 0.0)

                log_levels(agent)
                shown = await wait_counts(viewer, sid, EXPECTED)
                assert shown.status == "running"
                # Nobody watches: nothing was streamed, the counters came anyway.
                stats = agent.statistics()
                assert not stats.streaming and stats.bytes_sent == 0 and stats.records_sent == 0
                assert relay.statistics().viewer_streams == 0
                assert relay.statistics().streaming_sessions == 0
                # The relay holds the same numbers.
                assert counts_of(relay.sessions[sid].public_info()) == EXPECTED
            end = await log.wait_for(is_end(sid))
        ended = log.events[end]
        assert isinstance(ended, SessionEnded)
        assert (ended.reason, ended.status) == ("session_ended", "ended")
        assert ended.session is not None
        assert ended.session.status == "ended"
        assert counts_of(ended.session) == EXPECTED
        assert (ended.session.app, ended.session.environment) == ("counted", "staging")
        # The counters travelled as SESSION_COUNTS, never as one SESSION_CHANGED per change.
        between = log.about(sid)[1:-1]
        assert between, "no counters reached the viewer"
        assert all(isinstance(event, SessionCounts) for event in between), between
        assert viewer.session(sid) is None


async def test_records_logged_just_before_close_are_in_the_final_counts(relay: loupelive.Relay) -> None:
    """The SESSION_ENDED of an orderly end carries the session's *final* counters.

    The agent reports its counters at most once a second; records logged after
    its last report and just before the block is left (a short-lived program
    logging its last lines and exiting) must still be counted in the final
    information, which the agent knows exactly when it says GOODBYE.
    """
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            event_log(viewer) as log,
        ):
            async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="short-lived") as agent:
                sid = agent.session_id
                agent.log(Level.INFO, "starting", timestamp=STAMPS[0])
                # The first report goes at once; the next may not go for a second.
                await wait_until(lambda: relay.sessions[sid].info.records == 1)
                for i in range(1, 10):
                    agent.log(LEVELS[i], f"record {i}", timestamp=STAMPS[i])
                # ... and the program ends.
            end = await log.wait_for(is_end(sid))
        ended = log.events[end]
        assert isinstance(ended, SessionEnded) and ended.status == "ended"
        assert ended.session is not None
        assert counts_of(ended.session) == (10, 3, 2, 1, STAMPS[-1])


# -- 2. a killed agent process -----------------------------------------------------------------


async def test_a_killed_agent_is_disconnected_then_crashed(nursery: trio.Nursery) -> None:
    grace = 0.5
    relay: loupelive.Relay = await nursery.start(loupelive.serve_relay, test_config(agent_grace=grace))
    app = unique("killed")
    lines = [
        {"level": "info", "message": "started"},
        {"level": "error", "message": "first failure"},
        {"level": "warning", "message": "slow"},
        {"level": "critical", "message": "on fire"},
        {"level": "error", "message": "second failure"},
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            event_log(viewer) as log,
            run_cli(
                "pipe",
                "--app",
                app,
                "--format",
                "json",
                "--relay",
                f"127.0.0.1:{relay.agent_port}",
                stdin=True,
                env=child_env(LOUPE_ENVIRONMENT="prod-eu"),
            ) as pipe,
        ):
            sid = await pipe_session_id(pipe, app)
            info = await viewer.wait_for_session(sid)
            assert (info.app, info.pid, info.environment, info.status) == (
                app,
                pipe.pid,
                "prod-eu",
                "running",
            )
            await pipe.write("".join(json.dumps(line) + "\n" for line in lines))
            shown = await wait_counts(viewer, sid, 5)
            assert (shown.records, shown.warnings, shown.errors, shown.critical) == (5, 1, 2, 1)
            assert shown.last_record_at > 0

            mark = len(log.events)
            pipe.send_signal(signal.SIGKILL)
            assert await pipe.wait() == -signal.SIGKILL
            end = await log.wait_for(is_end(sid), start=mark)
            changes = [e for e in log.about(sid, mark) if not isinstance(e, SessionCounts)]
        assert [type(e) for e in changes] == [SessionChanged, SessionEnded], changes
        disconnected, ended = changes
        assert isinstance(disconnected, SessionChanged) and isinstance(ended, SessionEnded)
        assert disconnected.session.status == "disconnected"
        assert disconnected.session.records == 5
        assert (ended.status, ended.reason) == ("crashed", "agent_lost")
        assert ended.session is not None and ended.session.status == "crashed"
        assert (ended.session.records, ended.session.errors, ended.session.critical) == (5, 2, 1)
        # The relay waited its grace period for the agent before giving up on it.
        waited = log.times[end] - log.times[log.events.index(disconnected)]
        assert waited >= grace - 0.05, waited
        assert viewer.session(sid) is None


# -- 3. a network blip ---------------------------------------------------------------------------


async def test_a_network_blip_is_disconnected_then_running_with_counts_kept(nursery: trio.Nursery) -> None:
    relay: loupelive.Relay = await nursery.start(loupelive.serve_relay, test_config(agent_grace=30.0))
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as proxy_nursery:
            proxy = AgentProxy(relay.agent_port)
            port = await proxy.serve(proxy_nursery)
            async with (
                loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
                event_log(viewer) as log,
                loupelive.open_agent("127.0.0.1", port, app="blip") as agent,
            ):
                sid = agent.session_id
                log_levels(agent)
                await wait_counts(viewer, sid, EXPECTED)
                assert proxy.connections == 1

                mark = len(log.events)
                proxy.cut()  # both directions drop, as a network failure would
                down = await log.wait_for(is_status(sid, "disconnected"), start=mark)
                back = await log.wait_for(is_status(sid, "running"), start=down + 1)
                assert proxy.connections == 2, "the agent did not reconnect through the proxy"
                for index in (down, back):
                    event = log.events[index]
                    assert isinstance(event, SessionChanged)
                    # The relay kept the counters over the blip.
                    assert counts_of(event.session) == EXPECTED
                # The same session, still listed, still counting.
                agent.log(Level.ERROR, "after the blip", timestamp=STAMPS[-1] + 1)
                shown = await wait_counts(viewer, sid, (11, 3, 3, 1, STAMPS[-1] + 1))
                assert shown.status == "running"
                assert [s.session_id for s in viewer.sessions()] == [sid]
                assert not [e for e in log.about(sid) if isinstance(e, SessionEnded)]
                assert relay.sessions[sid].attachments == 2
            proxy_nursery.cancel_scope.cancel()


# -- 4. the bounded update rate ----------------------------------------------------------------


async def test_many_busy_sessions_cost_a_viewer_one_update_a_second(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """200 sessions logging all the time: one SESSION_COUNTS frame per
    LIST_UPDATE_INTERVAL, one entry per session in it, no SESSION_CHANGED."""
    sessions, seconds, step = 200, 6, 0.05
    relay: loupelive.Relay = await nursery.start(loupelive.serve_relay, test_config())
    with trio.fail_after(600):  # virtual seconds
        async with (
            loupelive.open_viewer(connector=relay.memory_connector("viewer")) as viewer,
            contextlib.AsyncExitStack() as stack,
        ):
            agents = [
                await stack.enter_async_context(
                    loupelive.open_agent(connector=relay.memory_connector("agent"), app=f"busy-{i:03d}")
                )
                for i in range(sessions)
            ]
            ids = {agent.session_id for agent in agents}
            await viewer.wait_sessions(lambda ss: {s.session_id for s in ss} == ids)
            async with event_log(viewer) as log:
                started = trio.current_time()
                logged = 0
                while trio.current_time() - started < seconds:
                    for agent in agents:
                        agent.log(Level.WARNING, "busy", logger="load")
                        logged += 1
                    await trio.sleep(step)
                elapsed = trio.current_time() - started
                # Everything logged shows up in the list, through the same updates.
                per_agent = logged // sessions
                await viewer.wait_sessions(
                    lambda ss: all(s.records == per_agent and s.warnings == per_agent for s in ss)
                )
                window_end = trio.current_time()
                await trio.testing.wait_all_tasks_blocked()  # the log has every event so far
            frames = [
                (t, e) for t, e in zip(log.times, log.events, strict=True) if isinstance(e, SessionCounts)
            ]
            others = [e for e in log.events if not isinstance(e, SessionCounts)]
        assert others == [], "counters changing must not send SESSION_CHANGED"
        window = window_end - started
        assert elapsed >= seconds and window < seconds + 3
        # At most one frame per interval (they come from one timer) ...
        assert len(frames) <= window / LIST_UPDATE_INTERVAL + 1, len(frames)
        times = [t for t, _ in frames]
        assert all(b - a >= LIST_UPDATE_INTERVAL - 1e-9 for a, b in itertools.pairwise(times)), times
        # ... with at most one entry per session ...
        per_session: dict[str, int] = dict.fromkeys(ids, 0)
        for _, frame in frames:
            assert isinstance(frame, SessionCounts)
            in_frame = [entry.session_id for entry in frame.counts]
            assert len(in_frame) == len(set(in_frame)), "a session twice in one frame"
            for session_id in in_frame:
                per_session[session_id] += 1
        assert max(per_session.values()) <= window / LIST_UPDATE_INTERVAL + 1, per_session
        # ... and every busy session updated about once a second.
        assert min(per_session.values()) >= seconds - 2, per_session
        # Far fewer list frames than records (20 records per session and second).
        assert logged >= sessions * seconds / step
        assert len(frames) * 100 < logged


# -- 5. pause and resume ----------------------------------------------------------------------


async def test_paused_list_sends_nothing_and_resume_catches_up(relay: loupelive.Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as paused,
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as control,
            event_log(paused) as paused_log,
            event_log(control) as control_log,
            loupelive.open_agent("127.0.0.1", relay.agent_port, app="stays") as stays,
        ):
            b = stays.session_id
            async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="goes") as goes:
                a = goes.session_id
                for _ in range(3):
                    stays.log(Level.INFO, "before the pause")
                await wait_counts(paused, b, 3)
                assert paused.session(a) is not None
                await paused.pause_list()
                # A question answered after the PAUSE_LIST: the relay has taken it.
                await paused.statistics()
                mark = len(paused_log.events)
                control_mark = len(control_log.events)
            # While paused: a session ends, one starts, counters and viewers change.
            async with loupelive.open_agent("127.0.0.1", relay.agent_port, app="comes") as comes:
                c = comes.session_id
                stays.log(Level.ERROR, "while paused")
                stays.log(Level.ERROR, "while paused")
                comes.log(Level.WARNING, "new here")
                async with control.open_stream(b) as stream:
                    await wait_until(lambda: stays.statistics().viewers == 1)
                    # The control viewer (not paused) was told all of it ...
                    # (an end, an addition, a SESSION_CHANGED, SESSION_COUNTS).
                    await wait_counts(control, b, 5)
                    await control.wait_sessions(
                        lambda ss: any(s.session_id == b and s.viewers == 1 for s in ss)
                    )
                    await control_log.wait_for(
                        lambda e: isinstance(e, SessionCounts) and concerns(e, c), start=control_mark
                    )
                    told = control_log.events[control_mark:]
                    assert any(is_end(a)(e) for e in told)
                    assert any(isinstance(e, SessionAdded) and e.session.session_id == c for e in told)
                    assert any(isinstance(e, SessionChanged) and e.session.session_id == b for e in told)
                    # ... the paused one nothing: anything sent before this answer has arrived.
                    await paused.statistics()
                    await trio.testing.wait_all_tasks_blocked()
                    assert paused_log.events[mark:] == []
                    assert {s.session_id for s in paused.sessions()} == {a, b}
                    held = paused.session(b)
                    assert held is not None and (held.records, held.viewers) == (3, 0)

                    await paused.resume_list()
                    await paused.wait_sessions(lambda ss: {s.session_id for s in ss} == {b, c})
                    await paused_log.wait_for(
                        lambda e: isinstance(e, SessionChanged) and e.session.session_id == b, start=mark
                    )
                    await trio.testing.wait_all_tasks_blocked()  # the log has every event of the resync
                    # The list is the relay's truth again ...
                    truth = {sid: s.public_info() for sid, s in relay.sessions.items()}
                    for sid in (b, c):
                        mine, theirs = paused.session(sid), truth[sid]
                        assert mine is not None
                        assert (mine.app, mine.status, mine.viewers) == (
                            theirs.app,
                            theirs.status,
                            theirs.viewers,
                        )
                        assert counts_of(mine) == counts_of(theirs)
                    shown = paused.session(b)
                    assert shown is not None and (shown.records, shown.errors, shown.viewers) == (5, 2, 1)
                    # ... and the differences came as events.
                    caught_up = paused_log.events[mark:]
                    ends = [e for e in caught_up if isinstance(e, SessionEnded)]
                    assert [(e.session_id, e.reason) for e in ends] == [(a, "relay_lost")]
                    added = [e.session.session_id for e in caught_up if isinstance(e, SessionAdded)]
                    assert added == [c], caught_up
                    changed = [e.session for e in caught_up if isinstance(e, SessionChanged)]
                    assert [(s.session_id, s.records, s.viewers) for s in changed] == [(b, 5, 1)]
                    # Updates flow again.
                    stays.log(Level.WARNING, "after the resume")
                    await wait_counts(paused, b, 6)
                    assert stream.session_id == b


# -- 6. clock offset --------------------------------------------------------------------------


async def test_clock_offset_and_rtt_of_skewed_agents(relay: loupelive.Relay) -> None:
    skews = (12.5, -3.25)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
            loupelive.open_agent(
                "127.0.0.1", relay.agent_port, app="ahead", clock=lambda: time.time() + skews[0]
            ) as ahead,
            loupelive.open_agent(
                "127.0.0.1", relay.agent_port, app="behind", clock=lambda: time.time() + skews[1]
            ) as behind,
        ):
            ids = (ahead.session_id, behind.session_id)
            for sid in ids:
                info = await viewer.wait_for_session(sid)

            def measured(sessions: list[SessionInfo]) -> bool:
                infos = [viewer.session(sid) for sid in ids]
                return all(i is not None and i.clock_offset is not None for i in infos)

            await viewer.wait_sessions(measured)
            for sid, skew in zip(ids, skews, strict=True):
                info = viewer.session(sid)
                assert info is not None and info.clock_offset is not None and info.rtt is not None
                assert 0 <= info.rtt < 0.1, info.rtt
                # Symmetric loopback: within half the round trip, and a few ms.
                error = abs(info.clock_offset - skew)
                assert error <= info.rtt / 2 + 1e-3, (info.clock_offset, info.rtt)
                assert error < 0.005, (info.clock_offset, info.rtt)

            # tail --corrected-time: record times minus the offset.
            async with viewer.open_stream(ahead.session_id) as stream:
                await wait_until(lambda: ahead.statistics().viewers == 1)
                before = time.time()
                ahead.log(Level.INFO, "what time is it")
                after = time.time()
                [record] = await collect(stream, 1)
            assert isinstance(record, Record)
            assert before + skews[0] <= record.timestamp <= after + skews[0] + 1e-6
            info = viewer.session(ahead.session_id)
            assert info is not None and info.clock_offset is not None
            out = io.StringIO()
            printer = TailPrinter(out, TailOptions(format="json", corrected_time=True), viewer)
            printer.record(info, record)
            printed = json.loads(out.getvalue())
            assert printed["timestamp"] == record.timestamp
            assert printed["corrected_timestamp"] == round(record.timestamp - info.clock_offset, 6)
            assert before - 0.005 <= printed["corrected_timestamp"] <= after + 0.005

            # The same through the command line, for a viewer that joins later.
            async with run_cli(
                "tail",
                ahead.session_id,
                "--relay",
                f"127.0.0.1:{relay.viewer_port}",
                "--history",
                "10",
                "--format",
                "json",
                "--corrected-time",
            ) as tail:
                [line] = await tail.stdout.wait_count(1, "the record")
                shown = json.loads(line)
                assert shown["seq"] == record.seq and shown["timestamp"] == record.timestamp
                assert abs(shown["corrected_timestamp"] - (record.timestamp - skews[0])) < 0.005, shown
                assert_no_traceback(tail.stderr.text)


# -- 7. source locations ----------------------------------------------------------------------


async def test_live_handler_records_carry_their_source_location(relay: loupelive.Relay) -> None:
    this_function = inspect.currentframe()
    assert this_function is not None
    expected: list[tuple[int, str, int]] = []  # (line, function, thread id) per record
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            live_handler(f"127.0.0.1:{relay.agent_port}", app=unique("located")) as (handler, log),
            loupelive.open_viewer("127.0.0.1", relay.viewer_port) as viewer,
        ):
            await viewer.wait_for_session(handler.session_id)
            me = threading.get_ident()
            here = this_function.f_code.co_name

            expected.append((this_function.f_lineno + 1, here, me))
            log.warning("from the test")
            expected.append((this_function.f_lineno + 1, here, me))
            log.info("again from the test")

            def work() -> None:
                frame = inspect.currentframe()
                assert frame is not None
                expected.append((frame.f_lineno + 1, "work", threading.get_ident()))
                log.error("from a worker thread")

            worker = threading.Thread(target=work, name="located-worker")
            worker.start()
            await trio.to_thread.run_sync(worker.join)
            expected.append((this_function.f_lineno + 1, here, me))
            log.info("back on the main thread")

            async with viewer.open_stream(handler.session_id, history=100) as stream:
                items = await collect(stream, 4)
            records = [item for item in items if isinstance(item, Record)]
            assert len(records) == 4, items

            async with run_cli(
                "tail",
                handler.session_id,
                "--relay",
                f"127.0.0.1:{relay.viewer_port}",
                "--history",
                "100",
                "--format",
                "json",
            ) as tail:
                lines = await tail.stdout.wait_count(4, "the four records")
                await close_handler(handler)
                assert await tail.wait() == 0
            printed = json_lines(tail.stdout.lines)

    assert [r.message for r in records] == [
        "from the test",
        "again from the test",
        "from a worker thread",
        "back on the main thread",
    ]
    path = Path(__file__)
    for record, (line, function, thread_id) in zip(records, expected, strict=True):
        assert Path(record.file) == path, record
        assert (record.line, record.function, record.module) == (line, function, "test_parity"), record
        assert (record.process, record.thread_id) == (os.getpid(), thread_id), record
    assert records[2].thread == "located-worker"
    assert len({r.thread_id for r in records}) == 2
    assert records[0].thread_id != records[2].thread_id
    # tail --format json shows the same.
    assert len(lines) == 4
    keys = ("seq", "file", "line", "function", "module", "process", "thread_id")
    assert [{k: p[k] for k in keys} for p in printed[:4]] == [
        {k: r.to_json()[k] for k in keys} for r in records
    ]
    assert all(p["session_id"] == handler.session_id for p in printed[:4])
    assert printed[-1]["type"] == "session_ended"

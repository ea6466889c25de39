"""The web viewer in a real browser: headless Chromium driven by Selenium.

One Chromium for the module; each test gets its own relay (with a viewer
token) and web gateway in its Trio run, and its own page on a fresh origin, so
nothing (token, tabs) carries over between tests.  Selenium runs in worker
threads (see ``browser_helpers``) while the relay keeps serving; every wait is
a WebDriverWait on the page's state, never a sleep.

Environment:

* ``LOUPELIVE_ARTIFACTS``: directory for screenshots (default: the test's tmp_path);
* ``LOUPELIVE_UPDATE_SCREENSHOT=1``: also write the live-view screenshot to
  ``docs/web-viewer.png`` (the README's image);
* ``LOUPELIVE_CHROMIUM`` / ``LOUPELIVE_CHROMEDRIVER``: the browser (default
  ``/usr/bin/chromium`` and ``/usr/bin/chromedriver``, else found on PATH).
  Missing, the tests are skipped, except when ``CI`` is set: then they fail.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import json
import os
import random
import re
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import loupelive
from loupelive import Level
from loupelive.demo import demo_records, run_demo
from loupelive.web import serve_web

from .browser_helpers import Page, artifacts_dir, copy_file, in_ci, launch_chromium
from .conftest import TEST_TIMEOUT, test_config

if importlib.util.find_spec("selenium") is None:  # pragma: no cover - depends on the environment
    if in_ci():
        raise RuntimeError("selenium is not installed, and CI is set: the browser tests must run there")
    pytest.skip("selenium is not installed (pip install 'loupelive[test]')", allow_module_level=True)

from selenium.webdriver.common.keys import Keys

TOKEN = "browser-viewer-token"
REPO = Path(__file__).resolve().parent.parent
README_SCREENSHOT = REPO / "docs" / "web-viewer.png"

TRACEBACK = """Traceback (most recent call last):
  File "/srv/shop/payments.py", line 88, in charge
    response = await gateway.post("/v2/charges", json=payload, timeout=5.0)
shop.gateway.GatewayTimeout: card-gateway did not answer within 5.0s"""

#: An agent in its own process, killed by the test (a crash, as the relay sees it).
DOOMED_AGENT = """
import sys, trio, loupelive
async def main():
    port, session_id = int(sys.argv[1]), sys.argv[2]
    async with loupelive.open_agent(
        "127.0.0.1", port, app="doomed", environment="production", session_id=session_id
    ) as agent:
        agent.log(loupelive.Level.WARNING, "about to be killed", logger="doomed.main")
        await trio.sleep_forever()
trio.run(main)
"""

#: The "greyed out" colour of ended rows, as the page computes it.
FAINT_COLOR_JS = (
    "(function () { var p = document.createElement('span'); p.style.color = 'var(--fg-faint)';"
    " document.body.appendChild(p); var c = getComputedStyle(p).color; p.remove(); return c; })()"
)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium (fresh profile) for every test of the module."""
    chromium = launch_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.quit()


class WebServer:
    """A relay with a viewer token, and its web gateway, which can be stopped and restarted."""

    def __init__(self, nursery: trio.Nursery, relay: loupelive.Relay) -> None:
        self.nursery = nursery
        self.relay = relay
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self) -> None:
        """Serve the web viewer (on the same port as before, after a stop)."""
        scope, stopped = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            try:
                with scope:
                    await serve_web(self.relay, "127.0.0.1", self.port, task_status=task_status)
            finally:
                stopped.set()

        self.port = await self.nursery.start(run)
        self._scope, self._stopped = scope, stopped

    async def stop(self) -> None:
        """Stop the web gateway (its taps, its browsers' sockets, its port); the relay keeps running."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()


@pytest.fixture
async def web(nursery: trio.Nursery) -> WebServer:
    relay = await nursery.start(loupelive.serve_relay, test_config(viewer_token=TOKEN))
    server = WebServer(nursery, relay)
    await server.start()
    return server


@pytest.fixture
async def page(
    driver: Any, web: WebServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Page]:
    """The viewer page of this test's relay (a new origin: no token or tabs from other tests)."""
    page = Page(driver, f"http://127.0.0.1:{web.port}", artifacts_dir(tmp_path), request.node.name)
    await page.drain_console()
    yield page
    # Leave before the relay stops, so the page does not try to reconnect to it.
    await page.run(driver.get, "about:blank")
    await page.assert_console_clean(*page.allowed_console)


def agent_of(
    web: WebServer, app: str, **kwargs: Any
) -> contextlib.AbstractAsyncContextManager[loupelive.Agent]:
    return loupelive.open_agent("127.0.0.1", web.relay.agent_port, app=app, **kwargs)  # type: ignore[return-value]


async def row_cells(page: Page, session_id: str) -> dict[str, Any]:
    """What the session's row in the list shows."""
    cells: dict[str, Any] = await page.js(
        "(function (tr) { function t(s) { var n = tr.querySelector(s); return n ? n.textContent : null; }"
        " return { cls: tr.className, app: t('.s-app b'), version: t('.s-app .ver'), env: t('.s-env'),"
        " host: t('.s-host'), user: t('.s-user'), pid: t('.s-pid'), viewers: t('.s-viewers span'),"
        " errors: t('.s-errs .n-err'), warnings: t('.s-errs .n-warn'), status: t('.s-status'),"
        " statusCls: tr.querySelector('.s-status').className,"
        " color: getComputedStyle(tr.querySelector('.s-host')).color }; })"
        "(document.querySelector(arguments[0]))",
        page.row_css(session_id),
    )
    return cells


async def grid_scroll(page: Page, session_id: str) -> dict[str, float]:
    scroll: dict[str, float] = await page.js(
        "(function (g) { return {top: g.scrollTop, height: g.scrollHeight, client: g.clientHeight}; })"
        "(document.querySelector(arguments[0] + ' .grid'))",
        page.view_css(session_id),
    )
    return scroll


def at_bottom_js(page: Page, session_id: str) -> str:
    css = page.view_css(session_id) + " .grid"
    return (
        f"(function (g) {{ return g.scrollHeight > g.clientHeight"
        f" && g.scrollTop + g.clientHeight >= g.scrollHeight - 1; }})(document.querySelector({css!r}))"
    )


def record_seqs(rows: list[dict[str, Any]]) -> list[int]:
    return [row["seq"] for row in rows if row["kind"] == "record"]


# -- logging in ------------------------------------------------------------------------------


async def test_login_refuses_a_wrong_token_then_connects(page: Page, web: WebServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await page.goto("/")
        await page.wait(
            "!document.querySelector('#login').hidden && document.querySelector('#app').hidden",
            what="the login form",
        )
        assert await page.js("document.querySelector('#conn-status').textContent") == "offline"
        # A wrong token: refused, said so, and not kept anywhere.
        await page.type("#token", "not-the-token")
        await page.click("#login-button")
        error = await page.wait("document.querySelector('#login-error').textContent", what="a login error")
        assert "wrong token" in error
        assert await page.js(
            "[document.querySelector('#app').hidden, document.querySelector('#token').value,"
            " sessionStorage.getItem('loupelive.token'), document.querySelector('#conn-status').textContent]"
        ) == [True, "", None, "offline"]
        assert web.relay.statistics().rejected.get("bad_token") == 1
        # The right one, submitted with Enter.
        await page.type("#token", TOKEN + Keys.ENTER)
        await page.wait_connected()
        assert await page.js("document.querySelector('#login-error').textContent") == ""
        assert await page.js("document.querySelector('#login').hidden") is True
        assert (await page.js("document.querySelector('#relay-version').textContent")).startswith(
            "loupelive/"
        )
        assert await page.js("window.loupe.connection()") == {
            "authed": True,
            "connected": True,
            "listPaused": False,
        }
        # Kept for this tab (sessionStorage), never in the URL: a reload goes straight in.
        assert TOKEN not in await page.run(lambda: page.driver.current_url)
        assert await page.js("sessionStorage.getItem('loupelive.token')") == TOKEN
        await page.run(page.driver.refresh)
        await page.wait_connected()
        assert await page.js("document.querySelector('#login').hidden") is True
        assert web.relay.statistics().rejected.get("bad_token") == 1
        await page.assert_console_clean()


# -- the session list and a live tab ------------------------------------------------------------


async def test_session_appears_opens_and_shows_records_live(page: Page, web: WebServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        await page.wait(
            "!document.querySelector('#sessions-empty').hidden"
            " && document.querySelector('#sessions-empty').textContent === 'No sessions yet.'",
            what="the empty list",
        )
        # The agent starts after the page is open: the list updates by itself.
        async with agent_of(web, "shop", app_version="2.4.1", environment="staging") as agent:
            sid = agent.session_id
            history = [
                agent.log(Level.INFO, "service started", logger="shop.main"),
                agent.log(Level.WARNING, "cache is cold", logger="shop.cache"),
                agent.log(Level.ERROR, "payment gateway timeout", logger="shop.payments"),
            ]
            await page.wait_session_row(sid, "tr.classList.contains('has-errors')")
            cells = await row_cells(page, sid)
            info = agent.info
            assert (cells["app"], cells["version"], cells["env"]) == ("shop", "2.4.1", "staging")
            assert (cells["host"], cells["user"], cells["pid"]) == (info.host, info.user, str(info.pid))
            assert (cells["status"], cells["errors"], cells["warnings"]) == ("running", "1 err", "1 warn")
            assert "status-running" in cells["cls"].split()
            assert await page.js("document.querySelector('#session-count').textContent") == "1"

            # Open it: a tab, active, with the history, then live.
            await page.open_session(sid)
            await page.wait_view(sid, state="live", last_seq=str(history[-1]), total_rows="3")
            assert (
                await page.js(
                    "document.querySelector(arguments[0] + ' .tab-label').textContent", page.tab_css(sid)
                )
                == f"shop@{info.host}"
            )
            assert await page.js("document.querySelector('#sessions-panel').hidden") is True
            dom = await page.dom_rows(sid)
            assert [(r["seq"], r["text"]) for r in dom] == [
                ("1", "service started"),
                ("2", "cache is cold"),
                ("3", "payment gateway timeout"),
            ]
            assert ["level-INFO", "level-WARNING", "level-ERROR"] == [
                next(c for c in r["cls"].split() if c.startswith("level-")) for r in dom
            ]
            # The tap is a viewer of the session: the list says so.
            await page.wait_session_row(sid, "tr.querySelector('.s-viewers span').textContent === '1'")

            # Records logged now arrive live, in order, with all their fields.
            live = [
                agent.log(Level.DEBUG, "cache refresh took 4.2ms", logger="shop.cache", thread="worker-1"),
                agent.log(Level.INFO, "GET /cart 200 12.5ms", logger="shop.http", thread="http-2"),
                agent.log(
                    Level.ERROR,
                    "charge for order 1001 failed",
                    logger="shop.payments",
                    thread="http-3",
                    exception=TRACEBACK,
                    fields={"order": "1001", "amount": "31.50"},
                ),
                agent.log(Level.CRITICAL, "database unreachable", logger="shop.db", thread="http-1"),
            ]
            await page.wait_view(sid, last_seq=str(live[-1]), total_rows="7", state="live")
            rows = await page.rows(sid)
            assert [(r["seq"], r["level"], r["message"]) for r in rows[3:]] == [
                (live[0], "DEBUG", "cache refresh took 4.2ms"),
                (live[1], "INFO", "GET /cart 200 12.5ms"),
                (live[2], "ERROR", "charge for order 1001 failed"),
                (live[3], "CRITICAL", "database unreachable"),
            ]
            assert (rows[5]["logger"], rows[5]["thread"], rows[5]["exception"], rows[5]["fields"]) == (
                "shop.payments",
                "http-3",
                TRACEBACK,
                {"order": "1001", "amount": "31.50"},
            )
            dom = await page.dom_rows(sid)
            assert [r["seq"] for r in dom] == [str(s) for s in history + live]
            failed = next(r for r in dom if r["seq"] == str(live[2]))
            assert {"record", "level-ERROR", "has-exception"} <= set(failed["cls"].split())

            # Clicking a record opens its details: message, exception, fields, metadata.
            view = page.view_css(sid)
            await page.click(f'{view} .row.record[data-seq="{live[2]}"]')
            await page.wait(
                f"!document.querySelector({view + ' .details'!r}).hidden", what="the details panel"
            )
            details = await page.js(
                "(function (d) { function t(s) { return d.querySelector(s).textContent; }"
                " return { level: t('.d-level'), message: t('.d-message'), exception: t('.d-exception'),"
                " excHidden: d.querySelector('.d-exception').hidden, fields: t('.d-fields'),"
                " meta: t('.d-meta'), seq: t('.d-seq') }; })(document.querySelector(arguments[0]))",
                view + " .details",
            )
            assert (details["level"], details["message"], details["seq"]) == (
                "ERROR",
                "charge for order 1001 failed",
                f"seq {live[2]}",
            )
            assert (details["exception"], details["excHidden"]) == (TRACEBACK, False)
            assert "amount31.50" in details["fields"] and "order1001" in details["fields"]
            assert "shop.payments" in details["meta"] and "http-3" in details["meta"]
            assert await page.js(
                f"document.querySelector({view!r} + ' .row.selected').getAttribute('data-seq')"
            ) == str(live[2])
            await page.click(f"{view} .details-close")
            await page.wait(f"document.querySelector({view + ' .details'!r}).hidden", what="details closed")
        await page.assert_console_clean()


# -- filters ----------------------------------------------------------------------------------


async def test_level_filter_is_applied_by_the_relay(page: Page, web: WebServer) -> None:
    levels = [Level.DEBUG, Level.INFO, Level.WARNING, Level.ERROR, Level.CRITICAL]
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        async with agent_of(web, "levels") as agent:
            sid = agent.session_id
            logged = {agent.log(level, f"history {level.name}", logger="lv"): level for level in levels * 2}
            await page.open_session(sid)
            await page.wait_view(sid, last_seq="10", total_rows="10", matching_rows="10", min_level="10")

            # WARNING and above: the rows already here are filtered in the page …
            view = page.view_css(sid)
            await page.select(f"{view} select.level-filter", "30")
            await page.wait_tab(sid, state="live", minLevel=30)
            await page.wait_view(sid, min_level="30", matching_rows="6", total_rows="10")
            matching = await page.matching(sid)
            assert {r["level"] for r in matching} == {"WARNING", "ERROR", "CRITICAL"}
            assert record_seqs(matching) == [s for s, lv in logged.items() if lv >= Level.WARNING]
            dom = await page.dom_rows(sid)
            assert [r["seq"] for r in dom] == [str(s) for s in record_seqs(matching)]

            # … and the relay no longer sends what is below: INFO and DEBUG logged
            # now never reach the page (the WARNING after them does, so they would have).
            below = [agent.log(Level.INFO, f"unsent info {i}") for i in range(5)]
            below += [agent.log(Level.DEBUG, f"unsent debug {i}") for i in range(2)]
            marker = agent.log(Level.WARNING, "after the unsent ones")
            await page.wait_tab(sid, lastSeq=marker)
            rows = await page.rows(sid)
            assert record_seqs(rows) == [*range(1, 11), marker]
            assert not set(below) & set(record_seqs(rows))
            await page.wait_view(sid, total_rows="11", matching_rows="7")

            # Back down to INFO: the page starts over and gets the history at that
            # level, now including the INFO records it never had.
            await page.select(f"{view} select.level-filter", "20")
            await page.wait_tab(sid, state="live", minLevel=20, lastSeq=marker)
            logged.update(dict.fromkeys(below[:5], Level.INFO))
            logged.update(dict.fromkeys(below[5:], Level.DEBUG))
            logged[marker] = Level.WARNING
            rows = await page.rows(sid)
            assert record_seqs(rows) == sorted(s for s, lv in logged.items() if lv >= Level.INFO)
            await page.wait_view(sid, min_level="20", total_rows=str(len(rows)), matching_rows=str(len(rows)))
        await page.assert_console_clean()


TEXT_RECORDS = [
    (Level.INFO, "shop.http", "http-1", "GET /api/items/42 200 12.5ms", None),
    (Level.INFO, "shop.payments", "http-2", "order 1001 paid: teapot x2, 31.50 EUR", None),
    (Level.WARNING, "shop.db", "http-3", "slow query on orders: 55.1ms", None),
    (Level.ERROR, "shop.payments", "http-1", "charge for order 1002 failed", TRACEBACK),
    (Level.INFO, "shop.http", "http-4", "GET /cart 404 3.1ms", None),
    (Level.DEBUG, "shop.worker", "worker-1", "sent confirmation mail for order 1001", None),
    (Level.INFO, "shop.http", "http-2", "GET /api/items/7 200 8.0ms", None),
    (Level.INFO, "shop.http", "http-3", "GET /search 200 1205ms", None),
    (Level.INFO, "shop.http", "http-4", "GET /api/items/7 304 1.2ms", None),
]


async def test_text_and_regex_filters(page: Page, web: WebServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        async with agent_of(web, "texts") as agent:
            sid = agent.session_id
            records: dict[int, tuple[Any, ...]] = {}
            for level, logger, thread, message, exception in TEXT_RECORDS:
                seq = agent.log(level, message, logger=logger, thread=thread, exception=exception)
                records[seq] = (message, logger, thread, exception or "")
            await page.open_session(sid)
            await page.wait_view(sid, last_seq=str(max(records)), total_rows=str(len(records)))
            view = page.view_css(sid)

            def expected(pattern: re.Pattern[str]) -> list[int]:
                # What the page promises: message, logger, thread or exception, case-insensitive.
                return [seq for seq, texts in records.items() if any(pattern.search(t) for t in texts)]

            async def check(text: str, *, regex: bool) -> list[int]:
                await page.type(f"{view} input.text-filter", text)
                want = expected(re.compile(text if regex else re.escape(text), re.IGNORECASE))
                await wait_rendered(want)
                assert record_seqs(await page.matching(sid)) == want, text
                return want

            async def wait_rendered(want: list[int]) -> None:
                # Exactly these rows rendered (a count alone could be a stale one).
                await page.wait_view(sid, matching_rows=str(len(want)))
                await page.wait(
                    "JSON.stringify(Array.from(document.querySelectorAll(arguments[0]))"
                    ".map(function (n) { return Number(n.getAttribute('data-seq')); })) === arguments[1]",
                    view + " .grid .rows > .row.record:not([hidden])",
                    json.dumps(want, separators=(",", ":")),
                    what=f"rows {want} rendered",
                )

            # Plain text: a case-insensitive substring of message, logger, thread or exception.
            by_order = await check("ORDER", regex=False)
            assert len(by_order) == 4  # "orders" in a message, "order" in three more
            assert await check("gatewaytimeout", regex=False) == [4]  # only in the exception
            assert await check("http-4", regex=False) == [5, 9]  # the thread
            assert await check("12.5ms", regex=False) == [1]  # "." is a dot, not "any character"
            status = await page.js(f"document.querySelector({view + ' .status-line .st-rows'!r}).textContent")
            assert status == f"{len(records)} rows · 1 shown"

            # Regex: the same text now matches "1205ms" too.
            await page.click(f"{view} input.regex-toggle")
            await wait_rendered([1, 8])
            assert record_seqs(await page.matching(sid)) == [1, 8]
            assert await check(r"^GET /api/items/\d+ 200", regex=True) == [1, 7]

            # New records are filtered as they arrive.
            hit = agent.log(Level.INFO, "GET /api/items/9 200 4.4ms", logger="shop.http", thread="http-1")
            miss = agent.log(Level.INFO, "GET /cart 200 2.2ms", logger="shop.http", thread="http-1")
            await page.wait_view(sid, last_seq=str(miss))
            await wait_rendered([1, 7, hit])
            assert record_seqs(await page.matching(sid)) == [1, 7, hit]
            assert record_seqs(await page.rows(sid))[-2:] == [hit, miss]
            records[hit] = ("GET /api/items/9 200 4.4ms", "shop.http", "http-1", "")
            records[miss] = ("GET /cart 200 2.2ms", "shop.http", "http-1", "")

            # An invalid regex is flagged and filters nothing.
            await page.type(f"{view} input.text-filter", "(")
            await page.wait(
                f"document.querySelector({view + ' input.text-filter'!r}).classList.contains('invalid')",
                what="the invalid regex flagged",
            )
            title = await page.js(f"document.querySelector({view + ' input.text-filter'!r}).title")
            assert title.startswith("invalid regular expression")
            await wait_rendered(sorted(records))

            # Cleared: everything again.
            await page.type(f"{view} input.text-filter", "")
            await wait_rendered(sorted(records))
            await page.wait_view(sid, total_rows=str(len(records)))
            assert (
                await page.js(
                    f"document.querySelector({view + ' input.text-filter'!r}).classList.contains('invalid')"
                )
                is False
            )
        await page.assert_console_clean()


# -- pause and resume ---------------------------------------------------------------------------


async def test_pause_counts_new_matching_records_and_resume_follows_again(page: Page, web: WebServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        async with agent_of(web, "pausing") as agent:
            sid = agent.session_id
            first = [agent.log(Level.INFO, f"keep {i}", logger="p") for i in range(60)]
            await page.open_session(sid)
            await page.wait_view(sid, last_seq=str(first[-1]), total_rows="60", state="live", paused="false")
            await page.wait(at_bottom_js(page, sid), what="the grid following the newest row")
            view = page.view_css(sid)
            await page.type(f"{view} input.text-filter", "keep")
            await page.wait_view(sid, matching_rows="60")

            # Pause: the view stays where it is while records keep arriving.
            await page.click(f"{view} button.pause")
            await page.wait_view(sid, paused="true", new_count="0")
            assert (
                await page.js(f"document.querySelector({view + ' button.pause'!r}).textContent") == "Resume"
            )
            top = (await grid_scroll(page, sid))["top"]
            kept: list[int] = []
            noise: list[int] = []
            for i in range(12):
                if i % 5 in (1, 3):
                    noise.append(agent.log(Level.INFO, f"noise {i}", logger="p"))
                else:
                    kept.append(agent.log(Level.INFO, f"keep more {i}", logger="p"))
            assert len(kept) == 7
            last = max(kept + noise)
            # Exactly the K new records that match the filter are counted.
            await page.wait_view(sid, last_seq=str(last), total_rows="72", new_count="7", paused="true")
            badge = await page.js(
                "(function (n) { return [n.hidden, n.textContent]; })(document.querySelector(arguments[0]))",
                view + " .new-count",
            )
            assert badge == [False, "7 new"]
            assert (await page.tab_state(sid))["newCount"] == 7
            scroll = await grid_scroll(page, sid)
            assert scroll["top"] == top, "a paused view must not scroll"
            assert scroll["top"] + scroll["client"] < scroll["height"] - 1
            rows = await page.rows(sid)
            assert record_seqs(rows)[-12:] == sorted(kept + noise)

            # Resume: the count clears, the view is live again and at the newest row.
            await page.click(f"{view} button.pause")
            await page.wait_view(sid, paused="false", new_count="0", state="live")
            await page.wait(at_bottom_js(page, sid), what="the grid back at the newest row")
            assert await page.js(
                "(function (n) { return [n.hidden, n.textContent]; })(document.querySelector(arguments[0]))",
                view + " .new-count",
            ) == [True, ""]
            assert await page.js(f"document.querySelector({view + ' button.pause'!r}).textContent") == "Pause"
            dom = await page.dom_rows(sid)
            assert dom[-1]["seq"] == str(kept[-1])
            assert [int(r["seq"]) for r in dom][-7:] == kept
            assert (await page.tab_state(sid))["state"] == "live"

            # Again, resuming by clicking the "N new" badge.
            await page.click(f"{view} button.pause")
            await page.wait_view(sid, paused="true")
            more = [agent.log(Level.INFO, f"keep again {i}", logger="p") for i in range(3)]
            extra = agent.log(Level.INFO, "noise again", logger="p")
            await page.wait_view(sid, last_seq=str(extra), new_count="3")
            await page.click(f"{view} .new-count")
            await page.wait_view(sid, paused="false", new_count="0", state="live")
            await page.wait(at_bottom_js(page, sid), what="the grid at the newest row again")
            assert (await page.dom_rows(sid))[-1]["seq"] == str(more[-1])
        await page.assert_console_clean()


# -- gaps -------------------------------------------------------------------------------------


async def test_gaps_are_shown_as_rows(page: Page, web: WebServer) -> None:
    page.allowed_console.append(r"/ws' failed")
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        async with agent_of(web, "overflowing", buffer_records=20) as agent:
            sid = agent.session_id
            for i in range(3):
                agent.log(Level.INFO, f"before {i}")
            await page.open_session(sid)
            await page.wait_view(sid, last_seq="3", state="live")

            # 100 records in one synchronous burst: the agent's ring buffer keeps
            # the last 20 before its streamer runs, so 4..83 are lost at the source.
            for i in range(100):
                agent.log(Level.INFO, f"burst {i}")
            await page.wait_tab(sid, lastSeq=103)
            rows = await page.rows(sid)
            gaps = [r for r in rows if r["kind"] == "gap"]
            assert gaps == [{"kind": "gap", "first_seq": 4, "last_seq": 83, "reason": "agent_overflow"}]
            assert record_seqs(rows) == [1, 2, 3, *range(84, 104)]
            assert rows[3]["kind"] == "gap"
            dom = await page.dom_rows(sid)
            (gap_row,) = [r for r in dom if r["kind"] == "gap"]
            assert (gap_row["first"], gap_row["last"]) == ("4", "83")
            assert gap_row["text"] == (
                "⚠ 80 records lost (seq 4–83): agent_overflow"
                " — the agent's buffer overflowed before they could be sent"
            )
            assert dom.index(gap_row) == 3

            # The web gateway goes away (and its tap's history with it) while the
            # agent logs more than its buffer holds.  The page reconnects by itself
            # and resumes after seq 103: what the agent no longer has is a gap.
            await web.stop()
            await page.wait(
                "document.querySelector('#conn-status').textContent === 'reconnecting…'",
                what="the page noticing the lost connection",
            )
            for i in range(50):
                agent.log(Level.INFO, f"while away {i}")
            await web.start()
            await page.wait_connected()
            await page.wait_tab(sid, state="live", lastSeq=153)
            rows = await page.rows(sid)
            gaps = [r for r in rows if r["kind"] == "gap"]
            assert gaps == [
                {"kind": "gap", "first_seq": 4, "last_seq": 83, "reason": "agent_overflow"},
                {"kind": "gap", "first_seq": 104, "last_seq": 133, "reason": "history_unavailable"},
            ]
            assert record_seqs(rows) == [1, 2, 3, *range(84, 104), *range(134, 154)]
            dom = await page.dom_rows(sid)
            unavailable = [r for r in dom if r["kind"] == "gap" and r["first"] == "104"]
            assert [r["text"] for r in unavailable] == [
                "⚠ 30 records lost (seq 104–133): history_unavailable — no longer held by the agent"
            ]
            # And it is live again.
            seq = agent.log(Level.WARNING, "back to normal")
            await page.wait_view(sid, last_seq=str(seq), state="live")
            assert (await page.dom_rows(sid))[-1] == {
                "kind": "record",
                "cls": "row record level-WARNING",
                "seq": str(seq),
                "first": None,
                "last": None,
                "text": "back to normal",
            }
        await page.assert_console_clean(r"/ws' failed")


async def test_a_resumed_tab_with_a_level_filter_still_shows_the_gap(page: Page, web: WebServer) -> None:
    page.allowed_console.append(r"/ws' failed")
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        async with agent_of(web, "filtered", buffer_records=20) as agent:
            sid = agent.session_id
            for i in range(3):
                agent.log(Level.WARNING, f"seen {i}")
            await page.open_session(sid)
            await page.select(f"{page.view_css(sid)} select.level-filter", "30")
            await page.wait_tab(sid, state="live", minLevel=30, lastSeq=3)
            await web.stop()
            await page.wait(
                "document.querySelector('#conn-status').textContent === 'reconnecting…'",
                what="the page noticing the lost connection",
            )
            # Seqs 4..53, WARNING on every other one; the agent keeps 34..53, and 34 is INFO.
            levels = {
                agent.log(Level.WARNING if i % 2 else Level.INFO, f"away {i}"): i % 2 for i in range(50)
            }
            assert levels[34] == 0
            await web.start()
            await page.wait_connected()
            await page.wait_tab(sid, state="live", lastSeq=53)
            rows = await page.rows(sid)
            # WARNINGs 5, 7, ... 33 are gone for good: the page must be told.
            assert [r for r in rows if r["kind"] == "gap"] == [
                {"kind": "gap", "first_seq": 4, "last_seq": 33, "reason": "history_unavailable"}
            ]


# -- session ends --------------------------------------------------------------------------------


async def test_session_end_and_crash_are_shown(page: Page, web: WebServer, nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await page.login(TOKEN)
        doomed_id = str(uuid.uuid4())
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, "-c", DOOMED_AGENT, str(web.relay.agent_port), doomed_id],
                check=False,
            )
        )
        async with agent_of(web, "batch-job", environment="production") as agent:
            sid = agent.session_id
            agent.log(Level.INFO, "job started", logger="batch")
            await page.open_session(sid)
            await page.wait_view(sid, last_seq="1", state="live")
            await page.open_session(doomed_id)
            await page.wait_view(doomed_id, last_seq="1", state="live")
            assert await page.js("window.loupe.tabs()") == [sid, doomed_id]
            running = await row_cells(page, sid)
            faint = await page.js(FAINT_COLOR_JS)
            assert running["color"] != faint

            # Killed: the relay loses the agent's connection; with no grace period
            # the session is over at once, as crashed.
            process.kill()
            await page.wait_tab(doomed_id, state="ended", endCode="agent_lost")
            await page.wait_view(doomed_id, state="ended")
            rows = await page.rows(doomed_id)
            assert rows[-1]["kind"] == "end" and rows[-1]["code"] == "agent_lost"
            end_row = (await page.dom_rows(doomed_id))[-1]
            assert end_row["kind"] == "end" and "bad" in end_row["cls"].split()
            assert end_row["text"].startswith("■ agent lost (crashed)")
            banner = await page.js(
                "(function (b) { return [b.hidden, b.classList.contains('bad'), b.textContent]; })"
                "(document.querySelector(arguments[0]))",
                page.view_css(doomed_id) + " .end-banner",
            )
            assert banner[:2] == [False, True] and "agent lost (crashed)" in banner[2]
            await page.wait_session_row(doomed_id, "tr.classList.contains('status-crashed')")
            crashed = await row_cells(page, doomed_id)
            assert "ended" in crashed["cls"].split()
            assert crashed["status"] == "crashed" and "status-crashed" in crashed["statusCls"]
            assert crashed["color"] == faint

            # The other session is still live.
            seq = agent.log(Level.INFO, "job still running", logger="batch")
            await page.wait_tab(sid, lastSeq=seq, state="live")

        # Leaving the block ends the session cleanly.
        await page.wait_tab(sid, state="ended", endCode="session_ended")
        await page.wait_view(sid, state="ended")
        rows = await page.rows(sid)
        assert rows[-1]["kind"] == "end" and rows[-1]["code"] == "session_ended"
        await page.click(page.tab_css(sid))
        await page.wait(
            f"!document.querySelector({page.view_css(sid)!r}).hidden"
            f" && document.querySelector({page.view_css(sid) + ' .grid .row.end'!r})",
            what="the ended tab shown with its end row",
        )
        end_row = (await page.dom_rows(sid))[-1]
        assert end_row["kind"] == "end" and "bad" not in end_row["cls"].split()
        assert end_row["text"].startswith("■ session ended")
        banner = await page.js(
            "(function (b) { return [b.hidden, b.classList.contains('bad'), b.querySelector('.end-text')"
            ".textContent, b.querySelector('.rewatch').hidden]; })(document.querySelector(arguments[0]))",
            page.view_css(sid) + " .end-banner",
        )
        assert banner[:2] == [False, False] and banner[3] is True  # no "Reconnect stream": it is over
        assert banner[2].startswith("session ended")
        await page.wait_session_row(sid, "tr.classList.contains('status-ended')")
        ended = await row_cells(page, sid)
        assert "ended" in ended["cls"].split()
        assert ended["status"] == "ended" and "status-ended" in ended["statusCls"]
        assert ended["color"] == faint
        assert await page.js("document.querySelector('#session-count').textContent") == "0"
        await page.assert_console_clean()


# -- the screenshot ---------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


async def test_screenshot_of_a_live_view(page: Page, web: WebServer) -> None:
    """A realistic live view, saved as an artifact (and as the README's image on request)."""
    rng = random.Random(7)
    demo = list(itertools.islice(demo_records(rng), 3000))
    failure = next(r for r in demo if r[4])
    plain = [r for r in demo if not r[4]]
    history = [*plain[:160], failure, *plain[160:162]]
    live = plain[162:166]
    with trio.fail_after(TEST_TIMEOUT):
        await page.set_viewport(1400, 800)
        try:
            await page.goto("/")
            await page.click("#theme-toggle")  # auto -> dark, whatever the system prefers
            await page.login(TOKEN)
            async with (
                agent_of(web, "shop", app_version="2.4.1", environment="production") as shop,
                agent_of(web, "billing-worker", app_version="1.9.0", environment="production") as billing,
                agent_of(web, "search-indexer", app_version="0.7.3", environment="staging") as search,
                trio.open_nursery() as traffic,
            ):
                # The other sessions log demo traffic of their own meanwhile.
                traffic.start_soon(functools.partial(run_demo, billing, rate=12.0, seed=1))
                traffic.start_soon(functools.partial(run_demo, search, rate=6.0, seed=2))
                async with agent_of(
                    web, "nightly-report", app_version="3.1.0", environment="production"
                ) as job:
                    job.log(Level.INFO, "report sent to 12 recipients", logger="report")
                    report = job.session_id
                await page.wait_session_row(report, "tr.classList.contains('ended')")

                def log(agent: loupelive.Agent, record: tuple[Any, ...], timestamp: float) -> int:
                    level, logger, thread, message, exception, fields = record
                    return agent.log(
                        level,
                        message,
                        logger=logger,
                        thread=thread,
                        exception=exception,
                        fields=fields,
                        timestamp=timestamp,
                    )

                # The shop's last minute or so, with a failed charge near the end.
                history_end = time.time() - 0.41
                for i, record in enumerate(history):
                    log(shop, record, history_end - (len(history) - 1 - i) * 0.41)
                sid = shop.session_id
                await page.wait_session_row(sid, "tr.classList.contains('has-errors')")
                await page.open_session(billing.session_id)
                await page.open_session(sid)
                await page.wait_view(sid, state="live", last_seq=str(len(history)))
                view = page.view_css(sid)
                await page.click(f"{view} .row.record.has-exception")
                await page.wait(
                    f"!document.querySelector({view + ' .details'!r}).hidden"
                    f" && !document.querySelector({view + ' .d-exception'!r}).hidden",
                    what="the details of the failed charge",
                )
                # A few records arrive live; the view follows them.
                # (timestamps between the last history record's and now, in order)
                step = (time.time() - history_end) / (len(live) + 1)
                last = [log(shop, r, history_end + (i + 1) * step) for i, r in enumerate(live)][-1]
                await page.wait_view(sid, state="live", paused="false", last_seq=str(last))
                await page.wait(at_bottom_js(page, sid), what="the view following")
                await page.wait(
                    f"document.querySelector({view + ' .st-rate'!r}).textContent !== '0 rec/s'",
                    what="the tab's live record rate",
                )
                # The selected row is still on screen.
                await page.wait(
                    "(function (g, r) { if (!r) return false; var a = g.getBoundingClientRect(),"
                    " b = r.getBoundingClientRect(); return b.top >= a.top && b.bottom <= a.bottom; })"
                    f"(document.querySelector({view + ' .grid'!r}),"
                    f" document.querySelector({view + ' .row.selected'!r}))",
                    what="the selected row visible",
                )
                shot = await page.screenshot("web-viewer.png")

                # The session list, once the demo traffic shows in its rates.
                await page.click("#tab-sessions")
                await page.wait_session_row(
                    billing.session_id, "tr.querySelector('.s-rate .rate').textContent !== '0'"
                )
                list_shot = await page.screenshot("web-viewer-sessions.png")
                traffic.cancel_scope.cancel()
        finally:
            await page.reset_viewport()
        assert png_size(shot) == (1400, 800)
        assert png_size(list_shot) == (1400, 800)
        if os.environ.get("LOUPELIVE_UPDATE_SCREENSHOT") == "1":
            copy_file(shot, README_SCREENSHOT)
        await page.assert_console_clean()

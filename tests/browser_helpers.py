"""Helpers for the real-browser tests: headless Chromium driven by Selenium from Trio.

Selenium is synchronous, so every WebDriver call runs in a worker thread
(``trio.to_thread.run_sync``) while the relay and the web gateway keep serving
in the test's own Trio run.  Waits are Selenium ``WebDriverWait``s polling a
JavaScript expression in the page; a wait that times out saves a screenshot,
the page's HTML and the viewer's state next to the test's artifacts and says
where they are.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

T = TypeVar("T")

#: Bound of one wait for the page (a test's ``fail_after`` bounds the whole test).
WAIT_TIMEOUT = 15.0
#: How often a wait re-evaluates its condition.
POLL_INTERVAL = 0.02

#: Chromium flags: headless, no sandbox (containers), nothing talking to Google.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip, except in CI: there the browser is installed on purpose, so its absence is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure rather than a skip)", pytrace=False)
    pytest.skip(reason)


def _default_path(name: str) -> str:
    """Debian's /usr/bin/<name>, else whatever is on PATH."""
    path = f"/usr/bin/{name}"
    return path if os.path.exists(path) else shutil.which(name) or path


def browser_paths() -> tuple[str, str]:
    """The Chromium binary and chromedriver to use (skip or fail if missing)."""
    chromium = os.environ.get("LOUPELIVE_CHROMIUM") or _default_path("chromium")
    chromedriver = os.environ.get("LOUPELIVE_CHROMEDRIVER") or _default_path("chromedriver")
    missing = [p for p in (chromium, chromedriver) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        skip_or_fail(
            "the real-browser tests need Chromium and chromedriver; not found: "
            + ", ".join(missing)
            + " (install them, or point LOUPELIVE_CHROMIUM / LOUPELIVE_CHROMEDRIVER at them)"
        )
    return chromium, chromedriver


def launch_chromium(profile_dir: Path) -> Any:
    """A headless Chromium with a fresh profile, its console logged at every level."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_script_timeout(WAIT_TIMEOUT)
    return driver


def artifacts_dir(fallback: Path) -> Path:
    """Where screenshots go: ``$LOUPELIVE_ARTIFACTS`` if set, else ``fallback`` (the test's tmp_path)."""
    configured = os.environ.get("LOUPELIVE_ARTIFACTS")
    path = Path(configured) if configured else fallback
    path.mkdir(parents=True, exist_ok=True)
    return path


class Page:
    """The viewer page in the shared browser, driven from Trio.

    Every method that talks to the browser runs Selenium in a worker thread.
    Console messages are collected as they are read (``get_log`` drains them)
    so a test can check at its end that nothing went wrong in the page.
    """

    def __init__(self, driver: Any, base_url: str, artifacts: Path, name: str) -> None:
        self.driver = driver
        self.base_url = base_url
        self.artifacts = artifacts
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.console: list[dict[str, Any]] = []
        #: Patterns of SEVERE console messages a test expects (checked at teardown too).
        self.allowed_console: list[str] = []
        self._checked = 0

    # -- plumbing -----------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking Selenium call in a worker thread."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def js(self, expression: str, *args: Any) -> Any:
        """Evaluate a JavaScript expression in the page (``arguments[i]`` are ``args``)."""
        return await self.run(self.driver.execute_script, f"return ({expression});", *args)

    async def wait(self, expression: str, *args: Any, what: str, limit: float = WAIT_TIMEOUT) -> Any:
        """Wait until the JavaScript ``expression`` is truthy; return its value.

        After ``limit`` seconds, saves what the page looked like and fails with ``what``.
        """
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        script = f"return ({expression});"
        last: list[Any] = [None]

        def condition(driver: Any) -> Any:
            last[0] = driver.execute_script(script, *args)
            return last[0]

        def wait() -> Any:
            return WebDriverWait(self.driver, limit, poll_frequency=POLL_INTERVAL).until(condition)

        try:
            return await self.run(wait)
        except TimeoutException:
            saved = await self.save_debug(f"timeout-{re.sub(r'[^A-Za-z0-9]+', '-', what)[:60]}")
            raise AssertionError(
                f"timed out after {limit:g} s waiting for {what}; "
                f"last value {last[0]!r}; page saved as {saved}.*"
            ) from None

    async def goto(self, path: str = "/") -> None:
        await self.run(self.driver.get, self.base_url + path)

    async def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def click(self, css: str) -> None:
        """A real (WebDriver) click on the first element matching ``css``."""
        element = await self.find(css)
        await self.run(element.click)

    async def type(self, css: str, text: str, *, replace: bool = True) -> None:
        """Type into an input like a user: select-all + delete first, then the keys."""
        from selenium.webdriver.common.keys import Keys

        element = await self.find(css)
        if replace:
            await self.run(element.send_keys, Keys.CONTROL, "a")
            await self.run(element.send_keys, Keys.BACKSPACE)
        if text:
            await self.run(element.send_keys, text)

    async def select(self, css: str, value: str) -> None:
        """Choose an option of a ``<select>`` (fires its change event)."""
        from selenium.webdriver.support.ui import Select

        element = await self.find(css)
        await self.run(lambda: Select(element).select_by_value(value))

    async def set_viewport(self, width: int, height: int) -> None:
        """Make the page's viewport exactly ``width`` x ``height`` CSS pixels."""
        await self.run(
            self.driver.execute_cdp_cmd,
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    async def reset_viewport(self) -> None:
        await self.run(self.driver.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})

    async def screenshot(self, filename: str) -> Path:
        path = self.artifacts / filename
        ok = await self.run(self.driver.save_screenshot, str(path))
        assert ok, f"could not save a screenshot to {path}"
        return path

    async def save_debug(self, label: str) -> Path:
        """Screenshot, HTML and the viewer's state, for a failure."""
        stem = self.artifacts / f"{self.name}-{label}"
        try:
            await self.run(self.driver.save_screenshot, f"{stem}.png")
            html = await self.run(lambda: self.driver.page_source)
            stem.with_suffix(".html").write_text(html, encoding="utf-8")
            state = await self.run(
                self.driver.execute_script,
                "return window.loupe ? {tabs: window.loupe.tabs().map(function (id) {"
                " return window.loupe.state(id); }), connection: window.loupe.connection(),"
                " sessions: window.loupe.sessions()} : null;",
            )
            stem.with_suffix(".json").write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
        except Exception as exc:  # the browser may be what broke
            stem.with_suffix(".txt").write_text(f"could not save the page: {exc!r}\n", encoding="utf-8")
        return stem

    # -- console ----------------------------------------------------------------------

    async def read_console(self) -> list[dict[str, Any]]:
        """Everything the page logged so far (this test's page only)."""
        self.console.extend(await self.run(self.driver.get_log, "browser"))
        return self.console

    async def drain_console(self) -> None:
        await self.run(self.driver.get_log, "browser")

    async def assert_console_clean(self, *expected: str) -> None:
        """No SEVERE console message since the last check, except ones matching ``expected``."""
        entries = await self.read_console()
        fresh = entries[self._checked :]
        self._checked = len(entries)
        patterns = [re.compile(p) for p in expected]
        severe = [
            entry["message"]
            for entry in fresh
            if entry.get("level") == "SEVERE" and not any(p.search(entry["message"]) for p in patterns)
        ]
        assert severe == [], "errors in the browser console:\n" + "\n".join(severe)

    # -- the viewer's DOM contract -------------------------------------------------------

    @staticmethod
    def row_css(session_id: str) -> str:
        return f'#sessions tbody tr.session[data-session-id="{session_id}"]'

    @staticmethod
    def tab_css(session_id: str) -> str:
        return f'#tabs .tab[data-session-id="{session_id}"]'

    @staticmethod
    def view_css(session_id: str) -> str:
        return f'#views .view[data-session-id="{session_id}"]'

    async def login(self, token: str) -> None:
        """Open the page, type the token, and wait until the app shows and is connected."""
        await self.goto("/")
        await self.wait("!document.querySelector('#login').hidden", what="the login form")
        await self.type("#token", token)
        await self.click("#login-button")
        await self.wait_connected()

    async def wait_connected(self) -> None:
        await self.wait(
            "!document.querySelector('#app').hidden"
            " && document.querySelector('#conn-status').textContent === 'connected'",
            what="the app, connected",
        )

    async def wait_session_row(self, session_id: str, condition: str = "true") -> Any:
        """Wait for the session's row in the list (``condition`` may use ``tr``)."""
        return await self.wait(
            f"(function (tr) {{ return tr && ({condition}) ? true : false; }})"
            f"(document.querySelector({json.dumps(self.row_css(session_id))}))",
            what=f"session row {session_id} with {condition}",
        )

    async def open_session(self, session_id: str) -> None:
        """Show the list, click the session's row, wait for its tab to be active and live."""
        await self.click("#tab-sessions")
        await self.wait_session_row(session_id)
        await self.click(self.row_css(session_id) + " .s-app")
        await self.wait(
            "(function (tab, view) { return tab && view && tab.classList.contains('active') && !view.hidden; })"
            f"(document.querySelector({json.dumps(self.tab_css(session_id))}),"
            f" document.querySelector({json.dumps(self.view_css(session_id))}))",
            what=f"the tab of {session_id}, active",
        )
        await self.wait_tab(session_id, state="live")

    async def tab_state(self, session_id: str) -> dict[str, Any]:
        state: dict[str, Any] = await self.js("window.loupe.state(arguments[0])", session_id)
        return state

    async def wait_tab(self, session_id: str, **expected: Any) -> dict[str, Any]:
        """Wait until ``window.loupe.state(session_id)`` has the ``expected`` values."""
        checks = " && ".join(f"s[{json.dumps(k)}] === {json.dumps(v)}" for k, v in expected.items())
        state: dict[str, Any] = await self.wait(
            f"(function (s) {{ return s && {checks or 'true'} ? s : null; }})"
            "(window.loupe.state(arguments[0]))",
            session_id,
            what=f"tab {session_id} with {expected}",
        )
        return state

    async def wait_view(self, session_id: str, **attributes: str) -> None:
        """Wait until the tab's ``.view`` has these ``data-*`` attributes (rendered DOM)."""
        pairs = {f"data-{k.replace('_', '-')}": v for k, v in attributes.items()}
        await self.wait(
            "(function (v, want) { if (!v) return false;"
            " for (var k in want) if (v.getAttribute(k) !== want[k]) return false; return true; })"
            f"(document.querySelector({json.dumps(self.view_css(session_id))}), arguments[0])",
            pairs,
            what=f"view {session_id} with {pairs}",
        )

    async def rows(self, session_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.js("window.loupe.rows(arguments[0])", session_id)
        return rows

    async def matching(self, session_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.js("window.loupe.matching(arguments[0])", session_id)
        return rows

    async def dom_rows(self, session_id: str) -> list[dict[str, Any]]:
        """The rows rendered in the tab's grid: kind, classes, data attributes and text."""
        rows: list[dict[str, Any]] = await self.js(
            "Array.from(document.querySelectorAll(arguments[0] + ' .grid .rows > .row:not([hidden])'))"
            ".map(function (n) { return {"
            " kind: n.classList.contains('record') ? 'record' : n.classList.contains('gap') ? 'gap'"
            " : n.classList.contains('end') ? 'end' : '?',"
            " cls: n.className, seq: n.getAttribute('data-seq'),"
            " first: n.getAttribute('data-first-seq'), last: n.getAttribute('data-last-seq'),"
            " text: n.querySelector('.c-msg .m').textContent }; })",
            self.view_css(session_id),
        )
        return rows


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)

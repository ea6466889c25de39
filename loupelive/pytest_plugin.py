"""pytest plugin: ``loupe_relay`` and ``loupe_capture`` fixtures, and live test runs.

Registered through the ``pytest11`` entry point; it has no effect unless its
fixtures or options are used.

* ``loupe_relay``: a relay in the test's Trio run (``loupelive.testing.open_relay``).
* ``loupe_capture``: a capture of every session on that relay; when a test that
  used it fails, the captured records are attached to the report as a section
  (like ``caplog``).
* ``pytest --loupe-relay HOST:PORT [--loupe-app NAME]``: streams this test
  process's own ``logging`` records live to an external relay as one session,
  each record tagged with the current test's node id, so the run can be watched
  with ``loupelive tail``. Connection trouble never fails or slows the tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest

from .handler import LiveHandler
from .testing import Capture, TestRelay, open_capture, open_relay

_CAPTURE_KEY = pytest.StashKey[Capture]()
_HANDLER_KEY = pytest.StashKey[LiveHandler]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loupelive", "loupelive live log relay")
    group.addoption(
        "--loupe-relay",
        metavar="HOST:PORT",
        default=None,
        help="stream this run's logging records live to the relay's agent port",
    )
    group.addoption(
        "--loupe-app", metavar="NAME", default=None, help="session name for --loupe-relay (default: pytest)"
    )


class _TestIdFilter(logging.Filter):
    """Tags every record with the node id of the test running now."""

    def __init__(self) -> None:
        super().__init__()
        self.nodeid = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.test = self.nodeid
        return True


_current_test = _TestIdFilter()


def pytest_configure(config: pytest.Config) -> None:
    relay = config.getoption("--loupe-relay", default=None)
    if not relay:
        return
    app = config.getoption("--loupe-app") or "pytest"
    handler = LiveHandler(relay, app=app, tags={"runner": "pytest"})
    handler.addFilter(_current_test)
    logging.getLogger().addHandler(handler)
    config.stash[_HANDLER_KEY] = handler


def pytest_unconfigure(config: pytest.Config) -> None:
    handler = config.stash.get(_HANDLER_KEY, None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    _current_test.nodeid = item.nodeid
    try:
        return (yield)
    finally:
        _current_test.nodeid = ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    capture = item.stash.get(_CAPTURE_KEY, None)
    if capture is not None and report.failed:
        report.sections.append(("Captured loupelive records", capture.dump()))
    return report


@pytest.fixture
async def loupe_relay() -> AsyncIterator[TestRelay]:
    """A relay in this test's Trio run, on 127.0.0.1 with ephemeral ports."""
    async with open_relay() as relay:
        yield relay


@pytest.fixture
async def loupe_capture(loupe_relay: TestRelay, request: pytest.FixtureRequest) -> AsyncIterator[Capture]:
    """Every record of every session on ``loupe_relay``, shown in the report on failure."""
    async with open_capture(loupe_relay) as capture:
        request.node.stash[_CAPTURE_KEY] = capture
        yield capture

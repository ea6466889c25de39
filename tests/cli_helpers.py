"""Helpers for the end-to-end CLI tests: ``python -m loupelive`` in real subprocesses.

A :class:`Child` pumps its stdout and stderr into lists of lines in background
tasks, so a test waits on *output* (``await child.stdout.wait_for(...)``) rather
than on time, and a child can never block on a full pipe.  Every child started
with :func:`run_cli` is killed (if still running) and reaped when its block ends,
whatever happened inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

T = TypeVar("T")

#: Generous bound for every CLI test: these machines are shared and noisy.
TEST_TIMEOUT = 30

#: Interval of the few waits that have no event to wait on (a file appearing,
#: a socket showing up in /proc); always bounded by the test's ``fail_after``.
POLL_INTERVAL = 0.05

#: Environment variables that would change what the commands do.
_SCRUBBED_ENV = ("NO_COLOR", "LOUPELIVE_AGENT_TOKEN", "LOUPELIVE_VIEWER_TOKEN")

_ANSI = re.compile(r"\x1b\[")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(extra)
    return env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "loupelive", *args]


class Lines:
    """The lines of one output stream of a child, as they arrive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.eof = False
        self._partial = b""
        self._changed = trio.Event()

    @property
    def text(self) -> str:
        tail = self._partial.decode("utf-8", "replace")
        return "".join(line + "\n" for line in self.lines) + tail

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def feed(self, data: bytes | bytearray) -> None:
        data = self._partial + bytes(data)
        *complete, self._partial = data.split(b"\n")
        if complete:
            self.lines.extend(raw.decode("utf-8", "replace") for raw in complete)
            self._notify()

    def close(self) -> None:
        self.eof = True
        self._notify()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, OSError):
                    # A pty master reports EIO once the child side is gone.
                    data = b""
                if not data:
                    break
                self.feed(data)
        finally:
            self.close()

    async def wait_for(self, predicate: Callable[[list[str]], T | None], what: str) -> T:
        """Wait until ``predicate(lines)`` returns something true; return it.

        Fails (instead of hanging until the test's deadline) if the stream ends
        first.
        """
        while True:
            result = predicate(self.lines)
            if result:
                return result
            if self.eof:
                raise AssertionError(f"{self.name} ended without {what}; it was:\n{self.text}")
            await self._changed.wait()

    async def wait_for_line(self, pattern: str, what: str | None = None) -> re.Match[str]:
        """The first line matching the regular expression ``pattern`` (``re.search``)."""
        regex = re.compile(pattern)

        def find(lines: list[str]) -> re.Match[str] | None:
            for line in lines:
                match = regex.search(line)
                if match:
                    return match
            return None

        return await self.wait_for(find, what or f"a line matching {pattern!r}")

    async def wait_count(self, count: int, what: str | None = None) -> list[str]:
        """Wait for at least ``count`` lines; return the first ``count``."""

        def enough(lines: list[str]) -> list[str] | None:
            return lines[:count] if len(lines) >= count else None

        return await self.wait_for(enough, what or f"{count} line(s)")

    async def wait_eof(self) -> None:
        while not self.eof:
            await self._changed.wait()


class Child:
    """A running ``python -m loupelive ...`` with its output collected."""

    def __init__(self, process: trio.Process, argv: Sequence[str]) -> None:
        self.process = process
        self.argv = list(argv)
        self.stdout = Lines(f"stdout of {' '.join(argv[2:])}")
        self.stderr = Lines(f"stderr of {' '.join(argv[2:])}")
        self._stdout_scope = trio.CancelScope()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def _pump_stdout(self, stream: trio.abc.ReceiveStream) -> None:
        with self._stdout_scope:
            await self.stdout.pump(stream)

    async def write(self, data: bytes | str) -> None:
        assert self.process.stdin is not None, "started without stdin=True"
        if isinstance(data, str):
            data = data.encode("utf-8")
        await self.process.stdin.send_all(data)

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None, "started without stdin=True"
        await self.process.stdin.aclose()

    async def close_stdout(self) -> None:
        """Stop reading stdout and close our end of the pipe (like ``| head`` exiting)."""
        self._stdout_scope.cancel()
        if self.process.stdout is not None:
            await self.process.stdout.aclose()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        """Wait for the exit and for all of its output; return the exit code."""
        code = await self.process.wait()
        await self.stdout.wait_eof()
        await self.stderr.wait_eof()
        return code

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv[2:])}\nexit: {self.returncode}\n"
            f"--- stdout ---\n{self.stdout.text}--- stderr ---\n{self.stderr.text}"
        )


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    """The only exception of a (nested) group of one, else the group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextlib.asynccontextmanager
async def run_cli(
    *args: str,
    stdin: bool = False,
    stdout: int | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Child]:
    """Start ``python -m loupelive *args``; kill and reap it when the block ends.

    ``stdin=True`` gives the test a pipe to the child's stdin (else /dev/null).
    ``stdout`` may be a file descriptor (a pty) instead of a pipe.
    """
    async with run_child(cli_argv(*args), stdin=stdin, stdout=stdout, env=env) as child:
        yield child


@contextlib.asynccontextmanager
async def run_child(
    argv: list[str],
    *,
    stdin: bool = False,
    stdout: int | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Child]:
    """Start ``argv`` with its output pumped into ``child.stdout`` / ``child.stderr``.

    The child is killed (if still running) and reaped when the block ends, and
    a failure inside the block shows what it printed.
    """
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        env=env if env is not None else child_env(),
    )
    child = Child(process, argv)
    try:
        async with trio.open_nursery() as nursery:
            if process.stdout is not None:
                nursery.start_soon(child._pump_stdout, process.stdout)
            else:
                child.stdout.close()
            assert process.stderr is not None
            nursery.start_soon(child.stderr.pump, process.stderr)
            try:
                yield child
            except BaseException as exc:
                # Whatever failed, show what this child said.
                exc.add_note(child.describe())
                raise
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    with trio.move_on_after(10):
                        await process.wait()
                    if process.stdin is not None:
                        await process.stdin.aclose()
    except BaseExceptionGroup as group:
        leaf = _single(group)
        if leaf is group:
            raise
        raise leaf from None


async def run_once(*args: str, input: bytes = b"", env: dict[str, str] | None = None) -> Result:
    """Run ``python -m loupelive *args`` to completion and capture its output."""
    completed = await trio.run_process(
        cli_argv(*args),
        stdin=input,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env if env is not None else child_env(),
    )
    return Result(
        args=list(args),
        returncode=completed.returncode,
        stdout=completed.stdout.decode("utf-8", "replace"),
        stderr=completed.stderr.decode("utf-8", "replace"),
    )


@attrs.frozen
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ loupelive {' '.join(self.args)}\nexit: {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


# -- the relay -----------------------------------------------------------------------


@attrs.define
class Relay:
    child: Child
    agent_port: int
    viewer_port: int
    ready: dict[str, Any]

    @property
    def agent(self) -> str:
        return f"127.0.0.1:{self.agent_port}"

    @property
    def viewer(self) -> str:
        return f"127.0.0.1:{self.viewer_port}"


def _read_if_exists(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


async def wait_for_file(path: Path) -> str:
    """Poll until ``path`` exists; return its text.  Bounded by the test's deadline."""
    while True:
        text = _read_if_exists(path)
        if text is not None:
            return text
        await trio.sleep(POLL_INTERVAL)


def _leftover_temporaries(ready_file: Path) -> list[Path]:
    return list(ready_file.parent.glob(ready_file.name + ".tmp*"))


@contextlib.asynccontextmanager
async def start_relay(tmp_path: Path, *extra: str) -> AsyncIterator[Relay]:
    """``serve`` on ephemeral loopback ports; yields once its ready file is written."""
    ready_file = tmp_path / "ready.json"
    async with run_cli(
        "serve",
        "--host",
        "127.0.0.1",
        "--agent-port",
        "0",
        "--viewer-port",
        "0",
        "--ready-file",
        str(ready_file),
        *extra,
    ) as child:
        # The log line comes first (event-driven); the ready file follows it
        # within the same step of the relay's startup.
        match = await child.stderr.wait_for_line(
            r"relay listening on \S+: agents on port (\d+), viewers on port (\d+)",
            "the relay's 'listening' log line",
        )
        with trio.fail_after(10):
            ready = json.loads(await wait_for_file(ready_file))
        expected = {"agent_port": int(match[1]), "viewer_port": int(match[2]), "pid": child.pid}
        assert {key: ready[key] for key in expected} == expected
        assert set(ready) <= {*expected, "metrics_port"}
        assert not _leftover_temporaries(ready_file), "the ready file's temporary was left behind"
        yield Relay(child, ready["agent_port"], ready["viewer_port"], ready)


# -- sockets of a child (Linux /proc) ------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _has_connection_to(pid: int, port: int) -> bool:
    inodes = _socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                established = fields[3] == "01"
                if remote_port == port and established and fields[9] in inodes:
                    return True
    return False


def _proc_available(pid: int) -> bool:
    return Path(f"/proc/{pid}/net/tcp").exists()


async def wait_for_connection(child: Child, port: int) -> None:
    """Wait until ``child`` holds an established TCP connection to ``port``.

    Needs Linux' /proc; elsewhere it returns at once (the tests stay correct,
    they just no longer prove the order of events they set up).
    """
    if not _proc_available(child.pid):
        return
    with trio.fail_after(15):
        while not _has_connection_to(child.pid, port):
            assert child.returncode is None, child.describe()
            await trio.sleep(POLL_INTERVAL)


# -- assertions ----------------------------------------------------------------------


def has_ansi(text: str) -> bool:
    return bool(_ANSI.search(text))


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr


def assert_cli_error(result: Result, code: int) -> str:
    """One ``loupelive: ...`` line on stderr, nothing on stdout, exit ``code``."""
    assert_no_traceback(result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("loupelive: "), str(result)
    assert result.returncode == code, str(result)
    assert result.stdout == "", str(result)
    return lines[0]


def json_lines(lines: Sequence[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}

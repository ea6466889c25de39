"""Process helpers for ``scripts/loadtest.py`` (Linux): spawning, cleanup and ``/proc`` readings.

* :func:`spawn` starts a child in its **own session and process group** (so a
  Ctrl-C on the terminal reaches only the coordinator, which then stops the
  children itself) with a parent-death signal (``prctl(PR_SET_PDEATHSIG)``), so
  that a coordinator killed with SIGKILL does not leave orphans behind.  Every
  child is remembered; :func:`terminate_all` signals each still-running
  child's process group (SIGTERM, then SIGKILL after a grace period).
* :func:`proc_sample` reads a process's resident set size and CPU time from
  ``/proc/PID/status`` and ``/proc/PID/stat``.
* :func:`listening_pid` finds the process that listens on a local TCP port
  (``/proc/net/tcp`` + ``/proc/*/fd``), for a relay this script did not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Final

import attrs

__all__ = [
    "ProcSample",
    "listening_pid",
    "proc_sample",
    "raise_nofile_limit",
    "spawn",
    "terminate",
    "terminate_all",
]

_PR_SET_PDEATHSIG: Final = 1
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

# Loaded here, in the parent: calling dlopen() between fork() and exec() is unsafe.
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux/glibc
    _LIBC = None

_started: list[subprocess.Popen[bytes]] = []


def _child_setup(parent: int, deathsig: int) -> Callable[[], None]:
    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, deathsig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    deathsig: int = signal.SIGKILL,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (its own process group), killed if we die.

    Call it from the main thread: the parent-death signal fires when the
    *thread* that forked exits.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_child_setup(os.getpid(), deathsig),
        env=dict(env) if env is not None else None,
        close_fds=True,
    )
    _started.append(proc)
    return proc


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the child leads its own group: pgid == pid


def terminate(proc: subprocess.Popen[bytes], *, grace: float = 5.0, sig: int = signal.SIGTERM) -> int:
    """Signal ``proc``'s group with ``sig``, then SIGKILL after ``grace`` seconds.

    Blocking; returns the exit status.
    """
    _signal_group(proc, sig)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        return proc.wait()


def terminate_all(grace: float = 5.0) -> list[int]:
    """Stop every child :func:`spawn` started that is still running (blocking).

    Returns the pids that had to be signalled.
    """
    running = [p for p in _started if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in running:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    return [p.pid for p in running]


@attrs.frozen
class ProcSample:
    """One reading of a process: resident set (now and peak) and CPU time."""

    rss_kb: int
    hwm_kb: int
    cpu_s: float


def proc_sample(pid: int) -> ProcSample | None:
    """RSS and CPU seconds (user + system) of ``pid``, or None if it is gone or hidden."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = hwm = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    # Fields after the command name (which may contain spaces): utime is the
    # 14th field of the line, stime the 15th.
    rest = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(rest[11]) + int(rest[12])) / _CLOCK_TICKS
    return ProcSample(rss_kb=rss, hwm_kb=hwm, cpu_s=cpu)


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def listening_pid(port: int) -> int | None:
    """The pid of a process listening on TCP ``port`` (any local address), if visible."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
        except OSError:
            continue
    return None


def raise_nofile_limit() -> int:
    """Raise this process's soft open-file limit to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft

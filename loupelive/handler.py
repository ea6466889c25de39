"""``LiveHandler``: publish a program's ``logging`` records as a live session.

Theory of operation
-------------------
The handler owns an :class:`~loupelive.agent.Agent` and runs it on a daemon
thread with its own ``trio.run``, so it works in any program: synchronous,
threaded, asyncio or Trio.  ``emit()`` runs in the thread that logged: it turns
the ``LogRecord`` into a :class:`~loupelive.records.Record` and appends it to the
agent's bounded ring buffer under a lock, and nothing else while nobody watches
(while a stream runs, it also schedules one wake-up of the agent's loop).  It
never blocks and never raises into the application: if the relay is down the
agent keeps retrying in the background and the buffer keeps the newest records.

Records from loupelive's own loggers (``loupelive.*``) and from the agent's
thread are never published, so the handler cannot feed on its own messages.

``close()`` (called by ``logging.shutdown()`` at interpreter exit) delivers what
current viewers are owed within ``close_timeout`` and ends the session.

After ``os.fork()`` the child starts with a fresh, unstarted agent (its own new
session, registered on its first record): a forked worker process appears as a
session of its own rather than silently sharing or losing the parent's.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Final

import trio

from .agent import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_RECORDS,
    DEFAULT_CLOSE_TIMEOUT,
    Agent,
    AgentStatistics,
    default_session_info,
    run_agent,
)
from .config import DEFAULT_AGENT_PORT

__all__ = ["LiveHandler"]

log = logging.getLogger("loupelive.handler")

#: The attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

#: Environment variables read by :meth:`LiveHandler.from_env`.
ENV_RELAY: Final = "LOUPELIVE_RELAY"
ENV_AGENT_TOKEN: Final = "LOUPELIVE_AGENT_TOKEN"
ENV_CA: Final = "LOUPELIVE_CA"

_OWN_LOGGER_PREFIX: Final = "loupelive"


def _parse_relay(relay: str) -> tuple[str, int]:
    if relay.startswith("["):
        host, _, port = relay[1:].partition("]")
        port = port.lstrip(":")
    elif relay.count(":") == 1:
        host, port = relay.split(":")
    else:
        host, port = relay, ""
    if port and not port.isdigit():
        raise ValueError(f"bad relay address {relay!r}: expected HOST[:PORT]")
    return host or "127.0.0.1", int(port) if port else DEFAULT_AGENT_PORT


class LiveHandler(logging.Handler):
    """A ``logging.Handler`` that streams records to a loupelive relay.

    Args:
      relay: ``"HOST[:PORT]"`` of the relay's agent port (default
        ``127.0.0.1:29971``); several relays of a cluster as a list or
        ``"a:29971,b:29971"``: when one fails the session moves to the next.
      app, app_version, tags: how the session is shown to viewers.
      environment: e.g. ``production`` (default ``$LOUPE_ENVIRONMENT``).
      token: the relay's agent token, if it requires one.
      tls: ``True`` (system trust store, or ``ca_file``) or an ``SSLContext``.
      buffer_records, buffer_bytes: the ring buffer bounds.
      close_timeout: how long ``close()`` may take to deliver what viewers are owed.
      level: the handler's level (records below it are not published).
    """

    def __init__(
        self,
        relay: str | Sequence[str] = f"127.0.0.1:{DEFAULT_AGENT_PORT}",
        *,
        app: str,
        app_version: str = "",
        environment: str | None = None,
        tags: Mapping[str, object] | None = None,
        session_id: str | None = None,
        token: str | None = None,
        tls: bool | ssl.SSLContext = False,
        ca_file: str | None = None,
        buffer_records: int = DEFAULT_BUFFER_RECORDS,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        # Several relays (a cluster), used in turn when one fails.
        parts = relay.split(",") if isinstance(relay, str) else list(relay)
        if not parts:
            raise ValueError("relay: at least one HOST[:PORT]")
        addresses = [_parse_relay(part.strip()) for part in parts]
        (self._host, self._port), self._fallbacks = addresses[0], addresses[1:]
        self._options: dict[str, Any] = {
            "app": app,
            "app_version": app_version,
            "environment": environment,
            "tags": dict(tags or {}),
        }
        self._agent_options: dict[str, Any] = {
            "token": token,
            "tls": tls,
            "ca_file": ca_file,
            "buffer_records": buffer_records,
            "buffer_bytes": buffer_bytes,
            "close_timeout": close_timeout,
        }
        self._close_timeout = close_timeout
        self._state_lock = threading.Lock()
        self._agent = self._new_agent(session_id)
        self._thread: threading.Thread | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False
        self._needs_start = False
        self._start()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork_in_child(ref))

    @classmethod
    def from_env(cls, *, app: str, **kwargs: Any) -> LiveHandler:
        """A handler configured from the environment (e.g. by ``loupelive.testing``).

        ``LOUPELIVE_RELAY`` (``HOST:PORT``, default ``127.0.0.1:29971``),
        ``LOUPELIVE_AGENT_TOKEN`` and ``LOUPELIVE_CA`` (a CA file: turns TLS on);
        keyword arguments as in the constructor override them.
        """
        kwargs.setdefault("relay", os.environ.get(ENV_RELAY) or f"127.0.0.1:{DEFAULT_AGENT_PORT}")
        if os.environ.get(ENV_AGENT_TOKEN):
            kwargs.setdefault("token", os.environ[ENV_AGENT_TOKEN])
        if os.environ.get(ENV_CA):
            kwargs.setdefault("ca_file", os.environ[ENV_CA])
            kwargs.setdefault("tls", True)
        return cls(app=app, **kwargs)

    # -- state ------------------------------------------------------------------

    def _new_agent(self, session_id: str | None = None) -> Agent:
        info = default_session_info(session_id=session_id, **self._options)
        options = self._agent_options
        return Agent(
            self._host,
            self._port,
            info,
            token=options["token"],
            tls=options["tls"],
            ca_file=options["ca_file"],
            buffer_records=options["buffer_records"],
            buffer_bytes=options["buffer_bytes"],
            quality=5,
            max_delay=0.0,
            sync_interval=30.0,
            close_timeout=options["close_timeout"],
            fallbacks=self._fallbacks,
        )

    @property
    def session_id(self) -> str:
        return self._agent.session_id

    @property
    def status(self) -> str:
        """``connecting``, ``connected``, ``disconnected`` (retrying) or ``closed``."""
        return "closed" if self._closed else self._agent.status

    @property
    def last_error(self) -> str:
        return self._agent.last_error

    def statistics(self) -> AgentStatistics:
        return self._agent.statistics()

    # -- the agent's thread --------------------------------------------------------

    def _start(self) -> None:
        ready = threading.Event()
        thread = threading.Thread(
            target=self._run,
            args=(self._agent, ready),
            name=f"loupelive-agent-{self._options['app']}",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        ready.wait()

    def _run(self, agent: Agent, ready: threading.Event) -> None:
        try:
            trio.run(self._main, agent, ready)
        except BaseException:  # the application must never see our failures
            # (logged under loupelive.*, which this handler never publishes)
            log.exception("the loupelive agent thread failed")
        finally:
            ready.set()

    async def _main(self, agent: Agent, ready: threading.Event) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with run_agent(agent, wait_connected=False):
            ready.set()
            await self._stop.wait()

    # -- logging.Handler -------------------------------------------------------------

    def _is_own(self, record: logging.LogRecord) -> bool:
        name = record.name
        return (
            name == _OWN_LOGGER_PREFIX
            or name.startswith(_OWN_LOGGER_PREFIX + ".")
            or threading.current_thread() is self._thread
        )

    def handle(self, record: logging.LogRecord) -> bool:
        # Our own messages are dropped before logging takes the handler's lock:
        # the agent thread must never wait for that lock (close() holds it
        # during logging.shutdown() while it waits for the agent thread).
        if self._is_own(record):
            return False
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        """Append ``record`` to the agent's buffer.  Never blocks, never raises.

        (Our own records were already turned away by :meth:`handle`.)
        """
        try:
            if self._needs_start:
                with self._state_lock:
                    if self._needs_start and not self._closed:
                        self._needs_start = False
                        self._start()
            exception = None
            if record.exc_info and record.exc_info[0] is not None:
                exception = (
                    self.formatter.formatException(record.exc_info)
                    if self.formatter
                    else (logging.Formatter().formatException(record.exc_info))
                )
            if record.stack_info:
                exception = f"{exception}\n{record.stack_info}" if exception else record.stack_info
            # Set difference runs in C; most records have no extra fields.
            extra = record.__dict__.keys() - _STANDARD_ATTRS
            fields = {k: str(record.__dict__[k]) for k in extra} if extra else None
            self._agent.add(
                timestamp=record.created,
                level=record.levelno,
                logger=record.name,
                message=record.getMessage(),
                thread=record.threadName or "",
                exception=exception,
                fields=fields,
                file=record.pathname or "",
                line=record.lineno or 0,
                function=record.funcName or "",
                module=record.module or "",
                process=record.process or 0,
                thread_id=record.thread or 0,
            )
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Nothing to do: records leave as soon as the agent's loop can send them."""

    def close(self) -> None:
        """Deliver what viewers are owed (within ``close_timeout``), end the session."""
        with self._state_lock:
            if self._closed:
                super().close()
                return
            self._closed = True
        thread = self._thread
        stop = self._stop
        if thread is not None and thread.is_alive() and stop is not None and self._token is not None:
            try:
                self._token.run_sync_soon(stop.set)
            except trio.RunFinishedError:
                pass
            thread.join(self._close_timeout + 1.0)
        super().close()

    def _after_fork(self) -> None:
        # The agent thread does not exist in the child and the locks may have
        # been copied held: start over with a new session of our own.
        self._state_lock = threading.Lock()
        self._agent = self._new_agent()
        self._thread = None
        self._stop = None
        self._token = None
        # Started by the child's first record, not here: threads started
        # inside a fork handler are best avoided.
        self._needs_start = not self._closed


def _after_fork_in_child(ref: weakref.ref[LiveHandler]) -> None:
    handler = ref()
    if handler is not None:
        handler._after_fork()

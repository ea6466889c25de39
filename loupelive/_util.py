"""Small helpers shared by the roles."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import trio

from .errors import LoupeError

__all__ = ["Backoff", "collapse_groups", "leaf_exception", "peer_name"]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def leaf_exception(exc: BaseException) -> BaseException:
    """The one exception that matters inside ``exc``, or ``exc`` itself.

    That is the only leaf other than ``trio.Cancelled``; or, when every such
    leaf is one of our own errors (several tasks of one connection noticing the
    same failure), the first of them.  Anything else stays a group.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)]
    if len(leaves) == 1:
        return leaves[0]
    if leaves and all(isinstance(leaf, LoupeError) for leaf in leaves):
        return leaves[0]
    return exc


@contextlib.contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise a group as the one exception that matters in it.

    Our context managers and handlers run nurseries internally; without this, an
    error from the caller's own block (or a documented error such as
    ``OSError``) would reach the caller wrapped in an ``ExceptionGroup`` that
    exists only because of our implementation.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = leaf_exception(group)
        if leaf is group:
            raise
        raise leaf from leaf.__cause__


class Backoff:
    """Exponential backoff with jitter for reconnecting clients.

    The first retry comes fast (``first`` seconds), each later one waits up to
    ``factor`` times longer, capped at ``maximum``; every delay is jittered to
    50–100 % of its value so that a thousand agents losing the same relay do
    not all come back in the same millisecond.
    """

    def __init__(self, *, first: float = 0.1, maximum: float = 5.0, factor: float = 2.0) -> None:
        if not 0 < first <= maximum or factor < 1:
            raise ValueError("backoff needs 0 < first <= maximum and factor >= 1")
        self.first = first
        self.maximum = maximum
        self.factor = factor
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next_delay(self) -> float:
        delay = self._next * random.uniform(0.5, 1.0)
        self._next = min(self._next * self.factor, self.maximum)
        return delay


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of a socket stream's peer, for log lines ("peer" if unknown)."""
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"{host}:{port}"
    except (AttributeError, OSError):
        return "peer"

"""Small helpers shared by the roles."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from .errors import LoupeError

__all__ = ["collapse_groups", "leaf_exception"]


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

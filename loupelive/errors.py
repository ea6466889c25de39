"""The error tree of loupelive.

Every error that loupelive raises on purpose is a :class:`LoupeError`.  Protocol
errors say who is at fault, in the way h11 does: a :class:`LocalProtocolError`
means *we* tried to do something the protocol forbids (a bug in the caller or in
loupelive); a :class:`RemoteProtocolError` means the peer sent something we cannot
accept, and it carries the machine-readable :class:`ErrorCode` that we send back
to the peer before closing.

Trio's own meanings are kept: ``trio.ClosedResourceError`` still means "we closed
it", ``trio.BrokenResourceError`` "the peer or the network did".  Connection code
translates them into :class:`ConnectionClosed` at one boundary
(``loupelive.connection``).
"""

from __future__ import annotations

import enum

__all__ = [
    "AuthenticationError",
    "ConnectionClosed",
    "ErrorCode",
    "HandshakeRejected",
    "LocalProtocolError",
    "LoupeError",
    "ProtocolError",
    "RemoteProtocolError",
    "SessionNotFound",
    "StreamDecodeError",
]


class ErrorCode(enum.StrEnum):
    """Machine-readable reasons carried by ``REJECT``, ``CLOSE``, ``STREAM_END``.

    The string values are part of the wire protocol (see ARCHITECTURE.md).
    """

    #: The first bytes were not the loupelive preamble.
    BAD_MAGIC = "bad_magic"
    #: A TLS ClientHello arrived on a plaintext port.
    TLS_ON_PLAINTEXT = "tls_on_plaintext"
    #: An HTTP request arrived on a loupelive port.
    HTTP_REQUEST = "http_request"
    #: The peer speaks a protocol version we do not.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: The HELLO names a role that this port does not serve.
    WRONG_ROLE = "wrong_role"
    #: The token was missing or wrong.
    BAD_TOKEN = "bad_token"
    #: A frame or message could not be parsed or failed validation.
    MALFORMED = "malformed"
    #: A frame announced a payload larger than the connection's limit.
    FRAME_TOO_LARGE = "frame_too_large"
    #: A frame kind we do not know.
    UNKNOWN_KIND = "unknown_kind"
    #: A well-formed message that is not allowed at this point.
    UNEXPECTED_MESSAGE = "unexpected_message"
    #: The connection ended in the middle of a frame.
    TRUNCATED = "truncated"
    #: The peer was silent for longer than its heartbeat deadline.
    TIMEOUT = "timeout"
    #: The session id named does not exist (or has ended).
    UNKNOWN_SESSION = "unknown_session"
    #: An agent registered a session id that is already live.
    SESSION_CONFLICT = "session_conflict"
    #: A data connection for a stream that the relay no longer wants.
    STALE_STREAM = "stale_stream"
    #: A configured limit (connections, sessions, viewers) was reached.
    LIMIT_REACHED = "limit_reached"
    #: The relay is shutting down.
    SHUTDOWN = "shutdown"
    #: The session ended normally (the agent said goodbye).
    SESSION_ENDED = "session_ended"
    #: The agent's connection dropped without an orderly goodbye.
    AGENT_LOST = "agent_lost"
    #: The stream was stopped (no viewers left, or the viewer left).
    STOPPED = "stopped"
    #: The viewer could not keep up and was disconnected.
    SLOW_CONSUMER = "slow_consumer"
    #: A compressed batch could not be decoded.
    BAD_STREAM = "bad_stream"
    #: Anything else; the reason text says what.
    INTERNAL = "internal"


class LoupeError(Exception):
    """Base class of every error loupelive raises on purpose."""


class ProtocolError(LoupeError):
    """The loupelive protocol was violated, by us or by the peer."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a caller's bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something we cannot accept.

    ``code`` is what we tell the peer in the ``CLOSE`` or ``REJECT`` frame.
    """


class StreamDecodeError(RemoteProtocolError):
    """A compressed batch of a session stream failed to decode (or was a bomb)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.BAD_STREAM)


class ConnectionClosed(LoupeError):
    """The connection is closed; ``code`` and ``reason`` say why.

    Raised by every operation on a connection that has closed, whoever closed it.
    """

    def __init__(self, reason: str, *, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        super().__init__(f"{reason} ({code.value})")
        self.reason = reason
        self.code = code


class HandshakeRejected(ConnectionClosed):
    """The relay refused our HELLO (wrong token, unknown session, …)."""


class AuthenticationError(HandshakeRejected):
    """The relay refused our credentials."""


class SessionNotFound(LoupeError):
    """No live session matches what the caller named."""

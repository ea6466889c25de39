"""loupelive: watch the logs of running applications live, through a relay.

The public API; see README.md for a tour and ARCHITECTURE.md for the protocol.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .agent import Agent, AgentStatistics, open_agent
from .config import RelayConfig
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ErrorCode,
    HandshakeRejected,
    LocalProtocolError,
    LoupeError,
    ProtocolError,
    RemoteProtocolError,
    SessionNotFound,
    StreamDecodeError,
)
from .handler import LiveHandler
from .messages import SessionAdded, SessionChanged, SessionEnded, SessionInfo
from .records import Gap, Level, Record
from .relay import Relay, RelayStatistics, SessionStatistics, ViewerStatistics, serve_relay
from .viewer import SessionEvent, Stream, Viewer, open_viewer

__all__ = [
    "Agent",
    "AgentStatistics",
    "AuthenticationError",
    "ConnectionClosed",
    "ErrorCode",
    "Gap",
    "HandshakeRejected",
    "Level",
    "LiveHandler",
    "LocalProtocolError",
    "LoupeError",
    "ProtocolError",
    "Record",
    "Relay",
    "RelayConfig",
    "RelayStatistics",
    "RemoteProtocolError",
    "SessionAdded",
    "SessionChanged",
    "SessionEnded",
    "SessionEvent",
    "SessionInfo",
    "SessionNotFound",
    "SessionStatistics",
    "Stream",
    "StreamDecodeError",
    "Viewer",
    "ViewerStatistics",
    "__version__",
    "open_agent",
    "open_viewer",
    "serve_relay",
]

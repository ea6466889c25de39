"""The control messages: attrs classes, and their JSON payloads on the wire.

Every frame except ``BATCH`` carries a UTF-8 JSON object.  Control traffic is
small and rare (registration, list updates, commands, heartbeats), so JSON costs
nothing that matters and makes a client in any language easy to write; the bulk
data (``BATCH``) is binary, see ``loupelive.records``.

:func:`encode_message` turns a message into frame bytes; :func:`decode_message`
turns a :class:`~loupelive.wire.Frame` into a message, validating every field and
raising :class:`RemoteProtocolError` (``malformed``) on anything unexpected.
Unknown JSON keys are ignored, so later versions can add optional fields.
"""

from __future__ import annotations

import enum
import json
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, TypeVar

import attrs

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .wire import Frame, FrameKind, encode_frame

__all__ = [
    "AGENT_FIELDS",
    "SESSION_STATUSES",
    "Accept",
    "AddViewer",
    "Close",
    "Counts",
    "CountsEntry",
    "GapNotice",
    "GetStats",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Message",
    "PauseList",
    "Reject",
    "RemoveViewer",
    "ReportCounts",
    "RequestSync",
    "ResumeList",
    "Role",
    "SessionAdded",
    "SessionChanged",
    "SessionCounts",
    "SessionEnded",
    "SessionInfo",
    "SnapshotBegin",
    "SnapshotEnd",
    "StartStream",
    "Stats",
    "StopStream",
    "StreamEnd",
    "decode_message",
    "encode_message",
]

#: Longest string accepted in session information (app, host, tag values, …).
MAX_INFO_STRING: Final = 1024
#: Most tags a session may carry.
MAX_TAGS: Final = 64


class Role(enum.StrEnum):
    """What a connection is for; named in HELLO."""

    #: An agent's long-lived connection: registration, commands, heartbeats.
    AGENT_CONTROL = "agent_control"
    #: An agent's connection carrying one stream of batches.
    AGENT_DATA = "agent_data"
    #: A viewer's long-lived connection: session list and updates.
    VIEWER_CONTROL = "viewer_control"
    #: A viewer's connection receiving one session's stream.
    VIEWER_DATA = "viewer_data"


AGENT_ROLES: Final = frozenset({Role.AGENT_CONTROL, Role.AGENT_DATA})
VIEWER_ROLES: Final = frozenset({Role.VIEWER_CONTROL, Role.VIEWER_DATA})


# -- validation helpers -----------------------------------------------------------

T = TypeVar("T")


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.MALFORMED)


def _get(obj: Mapping[str, Any], key: str, kind: type[T], default: Any = ...) -> T:
    if key not in obj or obj[key] is None:
        if default is ...:
            raise _bad(f"missing field {key!r}")
        return default  # type: ignore[no-any-return]
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise _bad(f"field {key!r} is out of range") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(f"field {key!r} must be {kind.__name__}, not {type(value).__name__}")
    if kind is float and not math.isfinite(value):  # type: ignore[arg-type]
        raise _bad(f"field {key!r} must be a finite number")
    if kind is str and len(value) > MAX_INFO_STRING * 64:  # type: ignore[arg-type]
        raise _bad(f"field {key!r} is too long")
    return value


def _get_int(obj: Mapping[str, Any], key: str, *, lo: int, hi: int, default: Any = ...) -> int:
    value = _get(obj, key, int, default)
    if value is not None and not lo <= value <= hi:
        raise _bad(f"field {key!r} must be in {lo}..{hi}")
    return value


def _get_enum(obj: Mapping[str, Any], key: str, kind: Callable[[str], T]) -> T:
    text = _get(obj, key, str)
    try:
        return kind(text)
    except ValueError:
        raise _bad(f"field {key!r} has unknown value {text!r}") from None


_U64: Final = 2**64 - 1
_U32: Final = 2**32 - 1


def _check_info_string(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if len(value) > MAX_INFO_STRING:
        raise ValueError(f"{attribute.name} is longer than {MAX_INFO_STRING} characters")


def _check_tags(_inst: object, _attribute: object, value: dict[str, str]) -> None:
    if len(value) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    for key, item in value.items():
        if len(key) > MAX_INFO_STRING or len(item) > MAX_INFO_STRING:
            raise ValueError("tag keys and values are limited to 1024 characters")


def _check_session_id(_inst: object, _attribute: object, value: str) -> None:
    if not value or len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"session_id must be 1-64 characters of letters, digits, '-', '_', '.': {value!r}")


def _tags_converter(value: Mapping[str, object] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (value or {}).items()}


#: What a session's ``status`` can be.
SESSION_STATUSES: Final = ("running", "disconnected", "ended", "crashed")


def _check_status(_inst: object, _attribute: object, value: str) -> None:
    if value not in SESSION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(SESSION_STATUSES)}, not {value!r}")


def _optional_float(obj: Mapping[str, Any], key: str) -> float | None:
    return _get(obj, key, float, None)


@attrs.frozen(kw_only=True)
class Counts:
    """A session's record counters, as its agent reports them.

    ``records`` counts every record logged (the last seq); ``critical``,
    ``errors`` and ``warnings`` count records at exactly those levels (a
    custom level counts with the named level below it); ``last_record_at``
    is the timestamp of the newest record (0: none yet).
    """

    records: int = 0
    critical: int = 0
    errors: int = 0
    warnings: int = 0
    last_record_at: float = 0.0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Counts:
        return cls(
            records=_get_int(obj, "records", lo=0, hi=_U64, default=0),
            critical=_get_int(obj, "critical", lo=0, hi=_U64, default=0),
            errors=_get_int(obj, "errors", lo=0, hi=_U64, default=0),
            warnings=_get_int(obj, "warnings", lo=0, hi=_U64, default=0),
            last_record_at=_get(obj, "last_record_at", float, 0.0),
        )


#: The SessionInfo fields an agent registers; the others are the relay's.
AGENT_FIELDS: Final = (
    "session_id",
    "app",
    "app_version",
    "environment",
    "host",
    "domain",
    "user",
    "pid",
    "os",
    "runtime",
    "agent_version",
    "started_at",
    "tags",
)


@attrs.frozen(kw_only=True)
class SessionInfo:
    """Who a session is (sent by the agent) and how it stands (added by the relay).

    The registration fields (:data:`AGENT_FIELDS`) come from the agent; the
    others are the relay's and are ignored when an agent sends them.
    """

    session_id: str = attrs.field(factory=lambda: str(uuid.uuid4()), validator=_check_session_id)
    app: str = attrs.field(default="", validator=_check_info_string)
    app_version: str = attrs.field(default="", validator=_check_info_string)
    #: e.g. ``production``, ``staging``.
    environment: str = attrs.field(default="", validator=_check_info_string)
    host: str = attrs.field(default="", validator=_check_info_string)
    domain: str = attrs.field(default="", validator=_check_info_string)
    user: str = attrs.field(default="", validator=_check_info_string)
    pid: int = 0
    #: Operating system name and version, e.g. ``Linux 6.1.0``.
    os: str = attrs.field(default="", validator=_check_info_string)
    #: Language runtime, e.g. ``CPython 3.11.7``.
    runtime: str = attrs.field(default="", validator=_check_info_string)
    agent_version: str = attrs.field(default="", validator=_check_info_string)
    started_at: float = 0.0
    tags: dict[str, str] = attrs.field(factory=dict, converter=_tags_converter, validator=_check_tags)
    # -- the relay's --
    connected_at: float = 0.0
    viewers: int = 0
    streaming: bool = False
    #: ``running``; ``disconnected`` while the relay waits for the agent to
    #: come back; ``ended`` (orderly end) or ``crashed`` (the agent's
    #: connection was lost for good) once over.
    status: str = attrs.field(default="running", validator=_check_status)
    records: int = 0
    critical: int = 0
    errors: int = 0
    warnings: int = 0
    last_record_at: float = 0.0
    #: The agent's clock minus the relay's, in seconds (None: not measured yet).
    clock_offset: float | None = None
    #: Round-trip time between relay and agent, in seconds (None: not measured).
    rtt: float | None = None
    #: In a cluster: the name of the relay the agent is connected to ("": a
    #: single relay).
    relay: str = attrs.field(default="", validator=_check_info_string)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def registration(self) -> SessionInfo:
        """Only the agent's fields (the relay's at their defaults)."""
        return SessionInfo(**{name: getattr(self, name) for name in AGENT_FIELDS})

    def with_counts(self, counts: Counts) -> SessionInfo:
        return attrs.evolve(
            self,
            records=counts.records,
            critical=counts.critical,
            errors=counts.errors,
            warnings=counts.warnings,
            last_record_at=counts.last_record_at,
        )

    @classmethod
    def from_json(cls, obj: object) -> SessionInfo:
        """Build from a JSON object.

        Raises:
          RemoteProtocolError: missing, mistyped or invalid fields.
        """
        if not isinstance(obj, dict):
            raise _bad("session must be an object")
        tags = _get(obj, "tags", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise _bad("tags must map strings to strings")
        counts = Counts.from_json(obj)
        try:
            return cls(
                session_id=_get(obj, "session_id", str),
                app=_get(obj, "app", str, ""),
                app_version=_get(obj, "app_version", str, ""),
                environment=_get(obj, "environment", str, ""),
                host=_get(obj, "host", str, ""),
                domain=_get(obj, "domain", str, ""),
                user=_get(obj, "user", str, ""),
                pid=_get_int(obj, "pid", lo=0, hi=_U32, default=0),
                os=_get(obj, "os", str, ""),
                runtime=_get(obj, "runtime", str, ""),
                agent_version=_get(obj, "agent_version", str, ""),
                started_at=_get(obj, "started_at", float, 0.0),
                tags=tags,
                connected_at=_get(obj, "connected_at", float, 0.0),
                viewers=_get_int(obj, "viewers", lo=0, hi=_U32, default=0),
                streaming=_get(obj, "streaming", bool, False),
                status=_get(obj, "status", str, "running"),
                records=counts.records,
                critical=counts.critical,
                errors=counts.errors,
                warnings=counts.warnings,
                last_record_at=counts.last_record_at,
                clock_offset=_optional_float(obj, "clock_offset"),
                rtt=_optional_float(obj, "rtt"),
                relay=_get(obj, "relay", str, ""),
            )
        except ValueError as exc:
            raise _bad(str(exc)) from exc


# -- messages -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Message:
    """Base class: every message knows its frame kind and its JSON form."""

    KIND: ClassVar[FrameKind]

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Message:
        raise NotImplementedError


@attrs.frozen(kw_only=True)
class Hello(Message):
    """Client → relay, the first frame after the preamble.

    Role-specific fields: ``session`` (agent_control: the registration);
    ``session_id`` and ``stream`` (agent_data); ``session_id``, ``history``,
    ``min_level`` and ``after_seq`` (viewer_data).
    """

    KIND: ClassVar = FrameKind.HELLO
    role: Role
    token: str | None = attrs.field(default=None, repr=False)
    client: str = ""
    session: SessionInfo | None = None
    #: agent_control: the per-session secret that lets this agent take its
    #: session back after a reconnect (never shown to viewers).
    secret: str | None = attrs.field(default=None, repr=False)
    session_id: str | None = None
    stream: int | None = None
    #: agent_data: the key from START_STREAM.
    key: str | None = attrs.field(default=None, repr=False)
    history: int = 0
    min_level: int = 0
    after_seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"role": self.role.value, "client": self.client}
        if self.token is not None:
            obj["token"] = self.token
        if self.secret is not None:
            obj["secret"] = self.secret
        if self.key is not None:
            obj["key"] = self.key
        if self.session is not None:
            obj["session"] = self.session.to_json()
        for key in ("session_id", "stream", "after_seq"):
            if getattr(self, key) is not None:
                obj[key] = getattr(self, key)
        if self.role is Role.VIEWER_DATA:
            obj["history"] = self.history
            obj["min_level"] = self.min_level
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Hello:
        session = obj.get("session")
        return cls(
            role=_get_enum(obj, "role", Role),
            token=_get(obj, "token", str, None),
            secret=_get(obj, "secret", str, None),
            key=_get(obj, "key", str, None),
            client=_get(obj, "client", str, ""),
            session=SessionInfo.from_json(session) if session is not None else None,
            session_id=_get(obj, "session_id", str, None),
            stream=_get_int(obj, "stream", lo=0, hi=_U32, default=None),
            history=_get_int(obj, "history", lo=0, hi=_U32, default=0),
            min_level=_get_int(obj, "min_level", lo=0, hi=255, default=0),
            after_seq=_get_int(obj, "after_seq", lo=0, hi=_U64, default=None),
        )


@attrs.frozen(kw_only=True)
class Accept(Message):
    """Relay → client: the HELLO was accepted."""

    KIND: ClassVar = FrameKind.ACCEPT
    relay: str = ""
    heartbeat_interval: float = 5.0
    session: SessionInfo | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"relay": self.relay, "heartbeat_interval": self.heartbeat_interval}
        if self.session is not None:
            obj["session"] = self.session.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Accept:
        session = obj.get("session")
        interval = _get(obj, "heartbeat_interval", float, 5.0)
        if not 0.01 <= interval <= 3600:
            raise _bad("heartbeat_interval out of range")
        return cls(
            relay=_get(obj, "relay", str, ""),
            heartbeat_interval=interval,
            session=SessionInfo.from_json(session) if session is not None else None,
        )


def _code(obj: Mapping[str, Any]) -> ErrorCode:
    text = _get(obj, "code", str, ErrorCode.INTERNAL.value)
    try:
        return ErrorCode(text)
    except ValueError:
        # A newer peer may send codes we do not know; keep the text readable.
        return ErrorCode.INTERNAL


@attrs.frozen(kw_only=True)
class Reject(Message):
    """Relay → client: the HELLO was refused; the relay closes next."""

    KIND: ClassVar = FrameKind.REJECT
    code: ErrorCode
    reason: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Reject:
        return cls(code=_code(obj), reason=_get(obj, "reason", str, ""))


@attrs.frozen(kw_only=True)
class Close(Message):
    """Either way: the sender is closing the connection, and why."""

    KIND: ClassVar = FrameKind.CLOSE
    code: ErrorCode
    reason: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Close:
        return cls(code=_code(obj), reason=_get(obj, "reason", str, ""))


@attrs.frozen(kw_only=True)
class Heartbeat(Message):
    """Either way: "still here".

    On an agent's control connection heartbeats also measure the agent's
    clock: the relay's probe carries ``time`` (the relay's clock, epoch
    seconds); the agent answers at once with ``echo`` (the probe's ``time``),
    ``time`` (its own clock when the probe arrived) and ``hold`` (seconds
    between then and the answer leaving).  Plain heartbeats are ``{}``.
    """

    KIND: ClassVar = FrameKind.HEARTBEAT
    time: float = 0.0
    echo: float = 0.0
    hold: float = 0.0

    def to_json(self) -> dict[str, Any]:
        # Heartbeats are most of an idle session's traffic: send "{}" unless
        # this is a clock probe or answer.
        obj: dict[str, Any] = {}
        if self.time:
            obj["time"] = self.time
        if self.echo:
            obj["echo"] = self.echo
            obj["hold"] = self.hold
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Heartbeat:
        hold = _get(obj, "hold", float, 0.0)
        if not 0.0 <= hold <= 3600.0:
            raise _bad("hold out of range")
        return cls(time=_get(obj, "time", float, 0.0), echo=_get(obj, "echo", float, 0.0), hold=hold)


@attrs.frozen(kw_only=True)
class StartStream(Message):
    """Relay → agent: open a data connection for stream ``stream``.

    ``key`` is an unguessable per-stream key the data connection must present:
    only the agent the relay commanded can feed the session's stream.
    """

    KIND: ClassVar = FrameKind.START_STREAM
    stream: int
    key: str = attrs.field(default="", repr=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StartStream:
        return cls(stream=_get_int(obj, "stream", lo=0, hi=_U32), key=_get(obj, "key", str, ""))


@attrs.frozen(kw_only=True)
class StopStream(Message):
    """Relay → agent: flush, end and close the data connection of ``stream``."""

    KIND: ClassVar = FrameKind.STOP_STREAM
    stream: int

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StopStream:
        return cls(stream=_get_int(obj, "stream", lo=0, hi=_U32))


@attrs.frozen(kw_only=True)
class AddViewer(Message):
    """Relay → agent: viewer ``viewer`` joined and wants this history and level.

    ``after_seq`` (instead of ``history``) asks for every held record after that
    seq: a viewer resuming where it stopped.  Sending it again for a known
    viewer replaces the request.
    """

    KIND: ClassVar = FrameKind.ADD_VIEWER
    viewer: int
    history: int = 0
    min_level: int = 0
    after_seq: int | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AddViewer:
        return cls(
            viewer=_get_int(obj, "viewer", lo=1, hi=_U32),
            history=_get_int(obj, "history", lo=0, hi=_U32, default=0),
            min_level=_get_int(obj, "min_level", lo=0, hi=255, default=0),
            after_seq=_get_int(obj, "after_seq", lo=0, hi=_U64, default=None),
        )


@attrs.frozen(kw_only=True)
class RemoveViewer(Message):
    """Relay → agent: viewer ``viewer`` left."""

    KIND: ClassVar = FrameKind.REMOVE_VIEWER
    viewer: int

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RemoveViewer:
        return cls(viewer=_get_int(obj, "viewer", lo=1, hi=_U32))


@attrs.frozen(kw_only=True)
class RequestSync(Message):
    """Relay → agent: make the next live batch a sync point."""

    KIND: ClassVar = FrameKind.REQUEST_SYNC

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RequestSync:
        return cls()


@attrs.frozen(kw_only=True)
class Goodbye(Message):
    """Agent → relay: the session ends normally; its data has been flushed."""

    KIND: ClassVar = FrameKind.GOODBYE
    reason: str = ""

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Goodbye:
        return cls(reason=_get(obj, "reason", str, ""))


@attrs.frozen(kw_only=True)
class SessionAdded(Message):
    """Relay → viewer: a live session (at connect, once per session; then new ones)."""

    KIND: ClassVar = FrameKind.SESSION_ADDED
    session: SessionInfo

    def to_json(self) -> dict[str, Any]:
        return {"session": self.session.to_json()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SessionAdded:
        return cls(session=SessionInfo.from_json(obj.get("session")))


@attrs.frozen(kw_only=True)
class SessionChanged(Message):
    """Relay → viewer: a session's information changed."""

    KIND: ClassVar = FrameKind.SESSION_CHANGED
    session: SessionInfo

    def to_json(self) -> dict[str, Any]:
        return {"session": self.session.to_json()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SessionChanged:
        return cls(session=SessionInfo.from_json(obj.get("session")))


@attrs.frozen(kw_only=True)
class SessionEnded(Message):
    """Relay → viewer: a session ended.

    ``reason`` is an ErrorCode value (``session_ended``, ``agent_lost``, …);
    ``status`` is ``ended`` (orderly) or ``crashed`` (the agent's connection
    was lost and did not come back); ``session`` is its final information.
    """

    KIND: ClassVar = FrameKind.SESSION_ENDED
    session_id: str
    reason: str = ""
    status: str = "ended"
    session: SessionInfo | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"session_id": self.session_id, "reason": self.reason, "status": self.status}
        if self.session is not None:
            obj["session"] = self.session.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SessionEnded:
        session = obj.get("session")
        status = _get(obj, "status", str, "ended")
        if status not in ("ended", "crashed"):
            raise _bad(f"unknown end status {status!r}")
        return cls(
            session_id=_get(obj, "session_id", str),
            reason=_get(obj, "reason", str, ""),
            status=status,
            session=SessionInfo.from_json(session) if session is not None else None,
        )


@attrs.frozen(kw_only=True)
class ReportCounts(Message):
    """Agent → relay: the session's record counters (see :class:`Counts`)."""

    KIND: ClassVar = FrameKind.COUNTS
    counts: Counts

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self.counts)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ReportCounts:
        return cls(counts=Counts.from_json(obj))


@attrs.frozen(kw_only=True)
class CountsEntry:
    """One session's line in SESSION_COUNTS."""

    session_id: str
    counts: Counts
    clock_offset: float | None = None
    rtt: float | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"session_id": self.session_id, **attrs.asdict(self.counts)}
        obj["clock_offset"] = self.clock_offset
        obj["rtt"] = self.rtt
        return obj

    @classmethod
    def of(cls, info: SessionInfo) -> CountsEntry:
        """A session's counters and clock estimate, from its information."""
        return cls(
            session_id=info.session_id,
            counts=Counts(
                records=info.records,
                critical=info.critical,
                errors=info.errors,
                warnings=info.warnings,
                last_record_at=info.last_record_at,
            ),
            clock_offset=info.clock_offset,
            rtt=info.rtt,
        )

    @classmethod
    def from_json(cls, obj: object) -> CountsEntry:
        if not isinstance(obj, dict):
            raise _bad("counts entries must be objects")
        return cls(
            session_id=_get(obj, "session_id", str),
            counts=Counts.from_json(obj),
            clock_offset=_optional_float(obj, "clock_offset"),
            rtt=_optional_float(obj, "rtt"),
        )


@attrs.frozen(kw_only=True)
class SessionCounts(Message):
    """Relay → viewer: live counters and clock estimates of sessions that changed."""

    KIND: ClassVar = FrameKind.SESSION_COUNTS
    counts: tuple[CountsEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"counts": [entry.to_json() for entry in self.counts]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SessionCounts:
        entries = _get(obj, "counts", list)
        return cls(counts=tuple(CountsEntry.from_json(entry) for entry in entries))


@attrs.frozen(kw_only=True)
class PauseList(Message):
    """Viewer → relay: stop sending session-list updates until RESUME_LIST."""

    KIND: ClassVar = FrameKind.PAUSE_LIST

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PauseList:
        return cls()


@attrs.frozen(kw_only=True)
class ResumeList(Message):
    """Viewer → relay: send a fresh snapshot, then updates again."""

    KIND: ClassVar = FrameKind.RESUME_LIST

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ResumeList:
        return cls()


@attrs.frozen(kw_only=True)
class SnapshotBegin(Message):
    """Relay → viewer: a fresh snapshot follows; forget the list held so far."""

    KIND: ClassVar = FrameKind.SNAPSHOT_BEGIN

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SnapshotBegin:
        return cls()


@attrs.frozen(kw_only=True)
class SnapshotEnd(Message):
    """Relay → viewer: every session live at connect time has been sent."""

    KIND: ClassVar = FrameKind.SNAPSHOT_END
    count: int

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SnapshotEnd:
        return cls(count=_get_int(obj, "count", lo=0, hi=_U32))


@attrs.frozen(kw_only=True)
class GetStats(Message):
    """Viewer → relay: ask for the relay's statistics."""

    KIND: ClassVar = FrameKind.GET_STATS
    detail: bool = False

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GetStats:
        return cls(detail=_get(obj, "detail", bool, False))


@attrs.frozen(kw_only=True)
class Stats(Message):
    """Relay → viewer: the relay's statistics as a JSON object."""

    KIND: ClassVar = FrameKind.STATS
    stats: dict[str, Any]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Stats:
        return cls(stats=_get(obj, "stats", dict))


@attrs.frozen(kw_only=True)
class GapNotice(Message):
    """Data connections: seqs ``first_seq..last_seq`` will not arrive.

    From an agent, ``viewer`` (non-zero) addresses the gap to one viewer (its
    history); zero means every viewer of the live stream.
    """

    KIND: ClassVar = FrameKind.GAP
    first_seq: int
    last_seq: int
    reason: str
    viewer: int = 0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GapNotice:
        first = _get_int(obj, "first_seq", lo=1, hi=_U64)
        last = _get_int(obj, "last_seq", lo=first, hi=_U64)
        return cls(
            first_seq=first,
            last_seq=last,
            reason=_get(obj, "reason", str),
            viewer=_get_int(obj, "viewer", lo=0, hi=_U32, default=0),
        )


@attrs.frozen(kw_only=True)
class StreamEnd(Message):
    """Data connections: the stream is over; ``last_seq`` is the last seq covered."""

    KIND: ClassVar = FrameKind.STREAM_END
    code: ErrorCode
    reason: str = ""
    last_seq: int = 0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StreamEnd:
        return cls(
            code=_code(obj),
            reason=_get(obj, "reason", str, ""),
            last_seq=_get_int(obj, "last_seq", lo=0, hi=_U64, default=0),
        )


_CLASSES: Final[dict[FrameKind, type[Message]]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Accept,
        Reject,
        Close,
        Heartbeat,
        StartStream,
        StopStream,
        AddViewer,
        RemoveViewer,
        RequestSync,
        Goodbye,
        SessionAdded,
        SessionChanged,
        SessionEnded,
        SnapshotEnd,
        GetStats,
        Stats,
        ReportCounts,
        SessionCounts,
        PauseList,
        ResumeList,
        SnapshotBegin,
        GapNotice,
        StreamEnd,
    )
}


def _default(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_message(message: Message) -> bytes:
    """Return ``message`` as one frame, ready to write."""
    try:
        payload = json.dumps(
            message.to_json(),
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_default,
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {message!r}: {exc}") from exc
    return encode_frame(message.KIND, payload)


def decode_message(frame: Frame) -> Message:
    """Parse the JSON payload of ``frame`` into its message class.

    Raises:
      RemoteProtocolError: ``frame`` is a BATCH (not JSON), or the payload is not
        a valid message of its kind.
    """
    cls = _CLASSES.get(frame.kind)
    if cls is None:
        raise RemoteProtocolError(
            f"{frame.kind.name} frames are not JSON messages", code=ErrorCode.UNEXPECTED_MESSAGE
        )
    try:
        text = frame.payload.decode("utf-8")
        obj = json.loads(text)
        # JSON can escape lone surrogates (\ud800) that no UTF-8 encoder can
        # write back: refuse them here rather than fail when relaying them.
        if "\\u" in text:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise _bad(f"{frame.kind.name} payload is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _bad(f"{frame.kind.name} payload must be a JSON object")
    try:
        return cls.from_json(obj)
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _bad(f"invalid {frame.kind.name}: {exc}") from exc

"""JSON control messages: round trips, validation, and malformed payloads."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loupelive.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from loupelive.messages import (
    MAX_INFO_STRING,
    MAX_TAGS,
    Accept,
    AddViewer,
    Close,
    Counts,
    CountsEntry,
    GapNotice,
    GetStats,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    PauseList,
    Reject,
    RemoveViewer,
    ReportCounts,
    RequestSync,
    ResumeList,
    Role,
    SessionAdded,
    SessionChanged,
    SessionCounts,
    SessionEnded,
    SessionInfo,
    SnapshotBegin,
    SnapshotEnd,
    StartStream,
    Stats,
    StopStream,
    StreamEnd,
    decode_message,
    encode_message,
)
from loupelive.wire import MAX_CONTROL_PAYLOAD, Frame, FrameDecoder, FrameKind

U32 = 2**32 - 1
U64 = 2**64 - 1

INFO = SessionInfo(
    session_id="web-1.prod_A",
    app="shop ☕",
    app_version="2.3.1",
    host="host-01",
    pid=4242,
    user="élodie",
    started_at=1_700_000_000.25,
    tags={"env": "prod", "région": "eu-west", "": ""},
    environment="production",
    domain="corp.example",
    os="Linux 6.1.0",
    runtime="CPython 3.11.7",
    agent_version="0.2.0",
)

MESSAGES: list[Message] = [
    Hello(role=Role.AGENT_CONTROL, token="s3cret", client="loupelive/0.1", session=INFO),
    Hello(role=Role.AGENT_DATA, token="s3cret", session_id=INFO.session_id, stream=U32),
    Hello(role=Role.VIEWER_CONTROL),
    Hello(role=Role.VIEWER_DATA, session_id="abc", history=500, min_level=30, after_seq=U64),
    Accept(),
    Accept(relay="loupelive-relay/0.1", heartbeat_interval=0.01, session=INFO),
    Reject(code=ErrorCode.BAD_TOKEN, reason="wrong token"),
    Close(code=ErrorCode.SHUTDOWN, reason=""),
    Heartbeat(time=1_700_000_000.123456),
    Heartbeat(),
    Heartbeat(time=1_700_000_000.5, echo=1_700_000_000.25, hold=0.000125),
    StartStream(stream=0),
    StopStream(stream=U32),
    AddViewer(viewer=1, history=100, min_level=255),
    AddViewer(viewer=U32, after_seq=0),
    RemoveViewer(viewer=9),
    RequestSync(),
    Goodbye(reason='bye ☃\n"quoted"'),
    Goodbye(),
    SessionAdded(session=INFO),
    SessionChanged(session=attrs.evolve(INFO, connected_at=1.5, viewers=3, streaming=True)),
    SessionEnded(session_id="abc", reason="agent_lost"),
    SessionEnded(
        session_id=INFO.session_id,
        reason="agent_lost",
        status="crashed",
        session=attrs.evolve(INFO, status="crashed", records=12, errors=2, clock_offset=-0.25, rtt=0.003),
    ),
    ReportCounts(counts=Counts(records=10, critical=1, errors=2, warnings=3, last_record_at=1_700_000_001.5)),
    ReportCounts(counts=Counts()),
    SessionCounts(counts=()),
    SessionCounts(
        counts=(
            CountsEntry(session_id="a", counts=Counts(records=U64, errors=1)),
            CountsEntry(session_id="b", counts=Counts(), clock_offset=0.5, rtt=0.001),
        )
    ),
    PauseList(),
    ResumeList(),
    SnapshotBegin(),
    SnapshotEnd(count=0),
    GetStats(detail=True),
    Stats(stats={"sessions": 3, "rejected": {"bad_token": 1}}),
    GapNotice(first_seq=1, last_seq=1, reason="viewer_slow"),
    GapNotice(first_seq=5, last_seq=U64, reason="history_unavailable", viewer=4),
    StreamEnd(code=ErrorCode.SESSION_ENDED),
    StreamEnd(code=ErrorCode.SLOW_CONSUMER, reason="too slow", last_seq=U64),
]


def frame_of(data: bytes) -> Frame:
    """Parse the bytes of exactly one frame (as encode_message returns)."""
    decoder = FrameDecoder(max_payload=MAX_CONTROL_PAYLOAD, expect_preamble=False)
    decoder.receive_data(data)
    frame = decoder.next_event()
    assert isinstance(frame, Frame)
    assert decoder.buffered == 0
    return frame


def decode_json(kind: FrameKind, obj: object) -> Message:
    return decode_message(Frame(kind, json.dumps(obj).encode()))


def outcome(frame: Frame) -> Message | ErrorCode:
    """The decoded message, or the code of the protocol error it raised."""
    try:
        return decode_message(frame)
    except RemoteProtocolError as exc:
        return exc.code


def test_every_json_kind_is_covered() -> None:
    assert {m.KIND for m in MESSAGES} == set(FrameKind) - {FrameKind.BATCH}


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message: Message) -> None:
    data = encode_message(message)
    frame = frame_of(data)
    assert frame.kind == message.KIND
    json.loads(frame.payload.decode("utf-8"))  # plain UTF-8 JSON
    decoded = decode_message(frame)
    assert decoded == message
    assert type(decoded) is type(message)
    # ... and back again: the same bytes.
    assert encode_message(decoded) == data


JSON_MESSAGES = [
    (FrameKind.HELLO, {"role": "agent_data", "client": "c", "token": "t", "session_id": "s", "stream": 3}),
    (
        FrameKind.HELLO,
        {
            "role": "viewer_data",
            "client": "",
            "session_id": "s",
            "after_seq": 7,
            "history": 0,
            "min_level": 40,
        },
    ),
    (FrameKind.ACCEPT, {"relay": "r", "heartbeat_interval": 3600.0}),
    (FrameKind.REJECT, {"code": "unknown_session", "reason": "no such session"}),
    (FrameKind.CLOSE, {"code": "timeout", "reason": "silent"}),
    (FrameKind.HEARTBEAT, {"time": -1.5}),
    (FrameKind.START_STREAM, {"stream": 12, "key": "k3y"}),
    (FrameKind.STOP_STREAM, {"stream": 12}),
    (FrameKind.ADD_VIEWER, {"viewer": 2, "history": 10, "min_level": 20, "after_seq": None}),
    (FrameKind.REMOVE_VIEWER, {"viewer": 2}),
    (FrameKind.REQUEST_SYNC, {}),
    (FrameKind.GOODBYE, {"reason": "done"}),
    (FrameKind.SESSION_ADDED, {"session": INFO.to_json()}),
    (FrameKind.SESSION_CHANGED, {"session": {**INFO.to_json(), "viewers": 2, "streaming": True}}),
    (FrameKind.SESSION_ENDED, {"session_id": "x", "reason": "session_ended", "status": "ended"}),
    (
        FrameKind.SESSION_ENDED,
        {
            "session_id": "x",
            "reason": "agent_lost",
            "status": "crashed",
            "session": {**INFO.to_json(), "status": "crashed"},
        },
    ),
    (FrameKind.COUNTS, {"records": 5, "critical": 0, "errors": 1, "warnings": 2, "last_record_at": 1.5}),
    (FrameKind.HEARTBEAT, {"time": 2.5, "echo": 1.25, "hold": 0.5}),
    (FrameKind.SNAPSHOT_END, {"count": U32}),
    (FrameKind.GAP, {"first_seq": 3, "last_seq": 9, "reason": "agent_overflow", "viewer": 0}),
    (FrameKind.STREAM_END, {"code": "stopped", "reason": "", "last_seq": 0}),
]


@pytest.mark.parametrize(("kind", "obj"), JSON_MESSAGES, ids=lambda v: getattr(v, "name", ""))
def test_json_round_trip(kind: FrameKind, obj: dict[str, Any]) -> None:
    message = decode_json(kind, obj)
    assert message.KIND == kind
    again = json.loads(frame_of(encode_message(message)).payload)
    assert again == obj


def test_session_info_round_trip() -> None:
    assert SessionInfo.from_json(INFO.to_json()) == INFO
    assert json.loads(json.dumps(INFO.to_json())) == INFO.to_json()


def test_session_info_defaults() -> None:
    info = SessionInfo.from_json({"session_id": "only-id"})
    assert info == SessionInfo(session_id="only-id")
    assert info.tags == {}
    assert not info.streaming


def test_session_id_defaults_to_a_valid_uuid() -> None:
    first, second = SessionInfo(), SessionInfo()
    assert first.session_id != second.session_id
    assert SessionInfo.from_json(first.to_json()) == first


def test_defaults_are_filled_in() -> None:
    assert decode_json(FrameKind.HEARTBEAT, {}) == Heartbeat(time=0.0)
    assert decode_json(FrameKind.GOODBYE, {}) == Goodbye(reason="")
    assert decode_json(FrameKind.ACCEPT, {}) == Accept(heartbeat_interval=5.0)
    assert decode_json(FrameKind.CLOSE, {}) == Close(code=ErrorCode.INTERNAL, reason="")
    assert decode_json(FrameKind.STREAM_END, {}) == StreamEnd(code=ErrorCode.INTERNAL)
    assert decode_json(FrameKind.ADD_VIEWER, {"viewer": 1}) == AddViewer(viewer=1)
    assert decode_json(FrameKind.HELLO, {"role": "viewer_control"}) == Hello(role=Role.VIEWER_CONTROL)


def test_null_means_absent_for_optional_fields() -> None:
    assert decode_json(FrameKind.HELLO, {"role": "agent_data", "token": None, "stream": None}) == Hello(
        role=Role.AGENT_DATA
    )


def test_integers_are_accepted_for_floats() -> None:
    message = decode_json(FrameKind.HEARTBEAT, {"time": 12})
    assert message == Heartbeat(time=12.0)
    assert isinstance(message, Heartbeat)
    assert isinstance(message.time, float)


def test_unknown_keys_are_ignored() -> None:
    assert decode_json(FrameKind.HEARTBEAT, {"time": 1, "future": [1, {"x": None}]}) == Heartbeat(time=1.0)
    session = {**INFO.to_json(), "colour": "blue", "nested": {"a": 1}}
    assert decode_json(FrameKind.SESSION_ADDED, {"session": session, "extra": 1}) == SessionAdded(
        session=INFO
    )


@pytest.mark.parametrize("kind", [FrameKind.REJECT, FrameKind.CLOSE, FrameKind.STREAM_END])
def test_unknown_error_code_becomes_internal(kind: FrameKind) -> None:
    message = decode_json(kind, {"code": "from_the_future", "reason": "newer peer"})
    assert message.code == ErrorCode.INTERNAL  # type: ignore[attr-defined]
    assert message.reason == "newer peer"  # type: ignore[attr-defined]


def test_error_codes_travel_as_their_string_values() -> None:
    payload = frame_of(encode_message(Close(code=ErrorCode.SLOW_CONSUMER, reason="r"))).payload
    assert json.loads(payload) == {"code": "slow_consumer", "reason": "r"}


def test_hello_json_form_is_role_specific() -> None:
    obj = json.loads(frame_of(encode_message(MESSAGES[3])).payload)
    assert obj == {
        "role": "viewer_data",
        "client": "",
        "session_id": "abc",
        "after_seq": U64,
        "history": 500,
        "min_level": 30,
    }
    obj = json.loads(frame_of(encode_message(Hello(role=Role.VIEWER_CONTROL, token="t"))).payload)
    assert obj == {"role": "viewer_control", "client": "", "token": "t"}


# -- malformed payloads -----------------------------------------------------------

MALFORMED = ErrorCode.MALFORMED


def case(kind: FrameKind, payload: object, id: str) -> Any:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return pytest.param(kind, raw, id=id)


def session(**changes: Any) -> dict[str, Any]:
    return {"session": {**INFO.to_json(), **changes}}


MALFORMED_PAYLOADS = [
    # not JSON at all
    case(FrameKind.HEARTBEAT, b"", "empty"),
    case(FrameKind.HEARTBEAT, b"{", "unterminated"),
    case(FrameKind.HEARTBEAT, b"{'time': 1}", "single-quotes"),
    case(FrameKind.HEARTBEAT, b'{"time": 1} x', "trailing-garbage"),
    case(FrameKind.GOODBYE, b'{"reason": "\xff"}', "invalid-utf8"),
    case(FrameKind.GOODBYE, b"\xc3", "truncated-utf8"),
    # JSON, but not an object
    case(FrameKind.HEARTBEAT, b"[]", "array"),
    case(FrameKind.HEARTBEAT, b"1", "number"),
    case(FrameKind.HEARTBEAT, b'"time"', "string"),
    case(FrameKind.HEARTBEAT, b"null", "null"),
    case(FrameKind.REQUEST_SYNC, b"true", "bool"),
    # missing required fields
    case(FrameKind.HELLO, {}, "hello-no-role"),
    case(FrameKind.START_STREAM, {}, "start-no-stream"),
    case(FrameKind.STOP_STREAM, {"stream": None}, "stop-null-stream"),
    case(FrameKind.ADD_VIEWER, {"history": 1}, "add-viewer-no-viewer"),
    case(FrameKind.REMOVE_VIEWER, {}, "remove-viewer-no-viewer"),
    case(FrameKind.SNAPSHOT_END, {}, "snapshot-no-count"),
    case(FrameKind.SESSION_ENDED, {"reason": "x"}, "ended-no-session-id"),
    case(FrameKind.SESSION_ENDED, {"session_id": "x", "status": "exploded"}, "ended-unknown-status"),
    case(
        FrameKind.SESSION_ADDED,
        {"session": {"session_id": "x", "status": "sleeping"}},
        "unknown-session-status",
    ),
    case(FrameKind.COUNTS, {"records": -1}, "negative-count"),
    case(FrameKind.SESSION_COUNTS, {"counts": [1]}, "counts-entry-not-object"),
    case(FrameKind.SESSION_COUNTS, {"counts": [{"records": 1}]}, "counts-entry-no-session"),
    case(FrameKind.HEARTBEAT, {"echo": 1.0, "hold": -1}, "negative-hold"),
    case(FrameKind.GAP, {"first_seq": 1, "last_seq": 2}, "gap-no-reason"),
    case(FrameKind.GAP, {"last_seq": 2, "reason": "r"}, "gap-no-first"),
    case(FrameKind.SESSION_ADDED, {}, "added-no-session"),
    case(FrameKind.SESSION_CHANGED, {"session": {"app": "x"}}, "session-no-id"),
    # wrong types
    case(FrameKind.START_STREAM, {"stream": True}, "bool-for-int"),
    case(FrameKind.START_STREAM, {"stream": "1"}, "string-for-int"),
    case(FrameKind.START_STREAM, {"stream": 1.0}, "float-for-int"),
    case(FrameKind.SNAPSHOT_END, {"count": [1]}, "list-for-int"),
    case(FrameKind.HEARTBEAT, {"time": "now"}, "string-for-float"),
    case(FrameKind.HEARTBEAT, {"time": True}, "bool-for-float"),
    case(FrameKind.GOODBYE, {"reason": 5}, "int-for-string"),
    case(FrameKind.CLOSE, {"code": 1, "reason": ""}, "int-for-code"),
    case(FrameKind.HELLO, {"role": "viewer_control", "token": 1234}, "int-for-token"),
    case(FrameKind.HELLO, {"role": "agent_control", "session": []}, "list-for-session"),
    case(FrameKind.SESSION_ADDED, {"session": "web-1"}, "string-for-session"),
    case(FrameKind.SESSION_ADDED, session(pid="12"), "string-for-pid"),
    case(FrameKind.SESSION_ADDED, session(streaming=1), "int-for-bool"),
    case(FrameKind.SESSION_ADDED, session(started_at="yesterday"), "string-for-started-at"),
    case(FrameKind.SESSION_ADDED, session(tags=["a"]), "list-for-tags"),
    case(FrameKind.SESSION_ADDED, session(tags={"a": 1}), "int-tag-value"),
    case(FrameKind.SESSION_ADDED, session(tags={"a": None}), "null-tag-value"),
    # non-finite numbers
    case(FrameKind.HEARTBEAT, b'{"time": NaN}', "nan"),
    case(FrameKind.HEARTBEAT, b'{"time": -Infinity}', "infinity"),
    case(FrameKind.HEARTBEAT, b'{"time": 1e999}', "overflowing-float"),
    case(FrameKind.ACCEPT, b'{"heartbeat_interval": NaN}', "nan-interval"),
    # out-of-range integers
    case(FrameKind.START_STREAM, {"stream": -1}, "negative-stream"),
    case(FrameKind.START_STREAM, {"stream": 2**32}, "stream-above-u32"),
    case(FrameKind.ADD_VIEWER, {"viewer": 0}, "viewer-zero"),
    case(FrameKind.REMOVE_VIEWER, {"viewer": 2**32}, "viewer-above-u32"),
    case(FrameKind.ADD_VIEWER, {"viewer": 1, "min_level": 256}, "min-level-above-u8"),
    case(FrameKind.ADD_VIEWER, {"viewer": 1, "after_seq": 2**64}, "after-seq-above-u64"),
    case(FrameKind.ADD_VIEWER, {"viewer": 1, "history": -1}, "negative-history"),
    case(FrameKind.HELLO, {"role": "viewer_data", "min_level": -1}, "hello-negative-level"),
    case(FrameKind.GAP, {"first_seq": 0, "last_seq": 2, "reason": "r"}, "gap-first-zero"),
    case(FrameKind.GAP, {"first_seq": 5, "last_seq": 4, "reason": "r"}, "gap-backwards"),
    case(FrameKind.STREAM_END, {"code": "stopped", "last_seq": -1}, "negative-last-seq"),
    case(FrameKind.SNAPSHOT_END, {"count": 10**30}, "huge-count"),
    case(FrameKind.SNAPSHOT_END, b'{"count": ' + b"9" * 5000 + b"}", "too-many-digits"),
    case(FrameKind.ACCEPT, {"heartbeat_interval": 0}, "interval-zero"),
    case(FrameKind.ACCEPT, {"heartbeat_interval": 3600.5}, "interval-too-long"),
    case(FrameKind.SESSION_ADDED, session(pid=-1), "negative-pid"),
    case(FrameKind.SESSION_ADDED, session(viewers=2**32), "viewers-above-u32"),
    # unknown role
    case(FrameKind.HELLO, {"role": "admin"}, "unknown-role"),
    case(FrameKind.HELLO, {"role": "AGENT_CONTROL"}, "role-wrong-case"),
    case(FrameKind.HELLO, {"role": 1}, "int-role"),
    # invalid session information
    case(FrameKind.SESSION_ADDED, session(session_id=""), "empty-session-id"),
    case(FrameKind.SESSION_ADDED, session(session_id="a b"), "space-in-session-id"),
    case(FrameKind.SESSION_ADDED, session(session_id="../etc/passwd"), "slash-in-session-id"),
    case(FrameKind.SESSION_ADDED, session(session_id="x" * 65), "long-session-id"),
    case(FrameKind.SESSION_ADDED, session(session_id=42), "int-session-id"),
    case(
        FrameKind.HELLO,
        {"role": "agent_control", "session": {"session_id": "bad id"}},
        "hello-bad-session-id",
    ),
    case(FrameKind.SESSION_ADDED, session(tags={str(i): "v" for i in range(MAX_TAGS + 1)}), "too-many-tags"),
    case(FrameKind.SESSION_ADDED, session(tags={"k": "v" * (MAX_INFO_STRING + 1)}), "long-tag-value"),
    case(FrameKind.SESSION_ADDED, session(tags={"k" * (MAX_INFO_STRING + 1): "v"}), "long-tag-key"),
    case(FrameKind.SESSION_ADDED, session(app="a" * (MAX_INFO_STRING + 1)), "long-app"),
    case(FrameKind.SESSION_ADDED, session(host="h" * (MAX_INFO_STRING + 1)), "long-host"),
    case(FrameKind.GOODBYE, {"reason": "r" * (MAX_INFO_STRING * 64 + 1)}, "huge-string"),
]


@pytest.mark.parametrize(("kind", "payload"), MALFORMED_PAYLOADS)
def test_malformed_payload(kind: FrameKind, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(Frame(kind, payload))
    assert info.value.code == MALFORMED


def test_limits_are_inclusive() -> None:
    assert decode_json(FrameKind.SESSION_ADDED, session(tags={str(i): "v" for i in range(MAX_TAGS)}))
    assert decode_json(FrameKind.SESSION_ADDED, session(app="a" * MAX_INFO_STRING, session_id="x" * 64))
    assert decode_json(FrameKind.ADD_VIEWER, {"viewer": U32, "min_level": 255, "after_seq": U64})
    assert decode_json(FrameKind.ACCEPT, {"heartbeat_interval": 0.01})


def test_session_id_may_use_unicode_letters_and_digits() -> None:
    assert decode_json(FrameKind.SESSION_ADDED, session(session_id="Zürich-٣_v1.2")) == SessionAdded(
        session=attrs.evolve(INFO, session_id="Zürich-٣_v1.2")
    )


def test_batch_frame_is_not_a_message() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(Frame(FrameKind.BATCH, b"{}"))
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_deeply_nested_json_is_malformed(opening: bytes) -> None:
    # A payload within the control frame limit must not escape as RecursionError.
    payload = opening * (MAX_CONTROL_PAYLOAD // len(opening))
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(Frame(FrameKind.HEARTBEAT, payload))
    assert info.value.code == MALFORMED


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        pytest.param(FrameKind.GOODBYE, b'{"reason": "\\ud800"}', id="goodbye-reason"),
        pytest.param(FrameKind.SESSION_ADDED, json.dumps(session(app="\udcff")).encode(), id="session-app"),
        pytest.param(
            FrameKind.SESSION_CHANGED, json.dumps(session(tags={"k\ud83d": "v"})).encode(), id="tag-key"
        ),
    ],
)
def test_lone_surrogate_escapes_are_refused_or_re_encodable(kind: FrameKind, payload: bytes) -> None:
    # A relay forwards what agents send (SessionAdded for every viewer): whatever
    # decode_message accepts must encode again.
    result = outcome(Frame(kind, payload))
    if isinstance(result, Message):
        assert decode_message(frame_of(encode_message(result))) == result
    else:
        assert result == MALFORMED


# -- encoding errors ----------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_not_sent(value: float) -> None:
    # The decoder rejects them (and they are not JSON), so sending one is our bug.
    with pytest.raises(LocalProtocolError):
        encode_message(Heartbeat(time=value))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SessionInfo(session_id="no spaces"),
        lambda: SessionInfo(session_id=""),
        lambda: SessionInfo(app="x" * (MAX_INFO_STRING + 1)),
        lambda: SessionInfo(tags={str(i): "" for i in range(MAX_TAGS + 1)}),
    ],
)
def test_session_info_validates_when_built(make: Any) -> None:
    with pytest.raises(ValueError, match=r"."):
        make()


def test_session_info_tags_are_stringified() -> None:
    assert SessionInfo(session_id="a", tags={"n": 1, 2: True}).tags == {"n": "1", "2": "True"}  # type: ignore[dict-item]


# -- properties -----------------------------------------------------------------------

# Lone surrogates cannot be encoded as UTF-8; they have their own test above.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
session_ids = st.text(
    st.sampled_from("abcXYZ019-_.é٣"),
    min_size=1,
    max_size=64,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
u32 = st.integers(0, U32)

session_infos = st.builds(
    SessionInfo,
    session_id=session_ids,
    app=texts,
    app_version=texts,
    host=texts,
    pid=u32,
    user=texts,
    started_at=finite,
    tags=st.dictionaries(texts, texts, max_size=MAX_TAGS),
    connected_at=finite,
    viewers=u32,
    streaming=st.booleans(),
)

messages = st.one_of(
    st.builds(SessionAdded, session=session_infos),
    st.builds(SessionChanged, session=session_infos),
    st.builds(
        Hello,
        role=st.sampled_from(list(Role)),
        token=st.none() | texts,
        client=texts,
        session=st.none() | session_infos,
        session_id=st.none() | texts,
        stream=st.none() | u32,
        after_seq=st.none() | st.integers(0, U64),
    ),
    st.builds(Heartbeat, time=finite),
    st.builds(Goodbye, reason=texts),
    st.builds(Close, code=st.sampled_from(list(ErrorCode)), reason=texts),
    st.builds(AddViewer, viewer=st.integers(1, U32), history=u32, min_level=st.integers(0, 255)),
    st.builds(StreamEnd, code=st.sampled_from(list(ErrorCode)), reason=texts, last_seq=st.integers(0, U64)),
    st.integers(1, U64).flatmap(
        lambda first: st.builds(
            GapNotice, first_seq=st.just(first), last_seq=st.integers(first, U64), reason=texts, viewer=u32
        )
    ),
)


@settings(max_examples=300, deadline=None)
@given(message=messages)
def test_message_round_trip_property(message: Message) -> None:
    data = encode_message(message)
    decoded = decode_message(frame_of(data))
    assert decoded == message
    assert encode_message(decoded) == data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(
    st.sampled_from(["role", "session", "session_id", "time", "reason", "code", "stream", "viewer", "tags"])
    | texts,
    json_values,
    max_size=6,
)


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from([k for k in FrameKind if k is not FrameKind.BATCH]), obj=json_objects)
def test_decoded_messages_re_encode(kind: FrameKind, obj: dict[str, Any]) -> None:
    result = outcome(Frame(kind, json.dumps(obj).encode()))
    if isinstance(result, Message):
        assert decode_message(frame_of(encode_message(result))) == result
    else:
        assert result == MALFORMED


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(FrameKind)), payload=st.binary(max_size=64))
def test_arbitrary_payloads_raise_only_protocol_errors(kind: FrameKind, payload: bytes) -> None:
    result = outcome(Frame(kind, payload))
    expected = ErrorCode.UNEXPECTED_MESSAGE if kind is FrameKind.BATCH else ErrorCode.MALFORMED
    assert isinstance(result, Message) or result == expected

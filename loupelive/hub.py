"""One session's fan-out: agent frames in, one bounded queue per viewer out.

Theory of operation
-------------------
The relay reads an agent's data connection at the agent's pace and hands every
frame to :meth:`Hub.on_batch` / :meth:`Hub.on_gap`, which are synchronous and
never block: each viewer (a :class:`Subscriber`) has its own memory channel, and
the hub only ever uses ``send_nowait``.  The frame bytes are encoded once and the
same ``bytes`` object is queued for every viewer, so fan-out costs one reference
per viewer, not one copy.

Each subscriber walks a small state machine, because a viewer can only decode a
stream from a sync point and must see every seq exactly once:

``PENDING``
    it asked to join; the agent has not yet sent its history.  Live batches are
    not for it (the history it will get covers them).
``WAIT_SYNC``
    its history arrived (ending at ``last_seq``); the next live batch, a sync
    point the agent makes for it, starts its live stream.
``LIVE``
    every live frame is queued for it.
``SKIPPING``
    its queue went over the byte budget, so the hub stopped queueing for it at
    ``skip_from`` and asked the agent for a sync point.  At the first sync point
    once the queue has drained below half the budget, it gets a GAP naming
    exactly the seqs it lost (reason ``viewer_slow``) and then that sync batch.
    The other viewers never notice.  A viewer that stays here longer than
    ``slow_viewer_timeout``, or that has lost more than ``max_loss`` of the
    records offered to it, is disconnected by its handler (``slow_consumer``).

Bytes are counted when queued and uncounted by the viewer's writer task when
written, so ``queued_bytes`` is what this viewer holds in relay memory.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from typing import Final, Protocol

import attrs
import trio

from .errors import ErrorCode
from .messages import AddViewer, Close, GapNotice, StreamEnd, encode_message
from .records import BatchHeader

__all__ = ["Hub", "Subscriber", "SubscriberState"]

#: Items a subscriber's channel may hold, on top of the byte budget: GAP and
#: STREAM_END frames are tiny, so a byte budget alone would not bound them.
MAX_QUEUED_ITEMS: Final = 65_536

log = logging.getLogger("loupelive.relay")

GAP_VIEWER_SLOW: Final = "viewer_slow"
GAP_STREAM_RESTART: Final = "stream_restart"


class SubscriberState(enum.Enum):
    PENDING = "pending"
    WAIT_SYNC = "wait_sync"
    LIVE = "live"
    SKIPPING = "skipping"
    ENDED = "ended"


@attrs.define(eq=False)
class Subscriber:
    """One viewer's data connection as the hub sees it."""

    id: int
    request: AddViewer
    budget: int
    #: Disconnect once more than this share of offered records was dropped …
    max_loss: float = 1.0
    #: … counted only once at least this many were offered.
    min_records: int = 0
    state: SubscriberState = SubscriberState.PENDING
    #: The last seq covered by what was queued for this viewer.
    last_seq: int = 0
    skip_from: int = 0
    #: When it started skipping (trio time), for the slow-viewer timeout.
    skipping_since: float = math.inf
    queued_bytes: int = 0
    frames_queued: int = 0
    bytes_queued_total: int = 0
    batches_dropped: int = 0
    records_offered: int = 0
    records_dropped: int = 0
    gaps: int = 0
    bytes_written: int = 0
    #: Set when the viewer has lost too large a share: its handler closes it.
    too_lossy: trio.Event = attrs.Factory(trio.Event)
    #: Counted once as a slow-consumer disconnect.
    slow_counted: bool = False
    #: While skipping: a sync point was asked for since its queue drained.
    sync_asked: bool = False
    #: Set when its handler is finished (everything queued was written or dropped).
    done: trio.Event = attrs.Factory(trio.Event)
    send_channel: trio.MemorySendChannel[bytes] = attrs.field(init=False)
    receive_channel: trio.MemoryReceiveChannel[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[bytes](MAX_QUEUED_ITEMS)

    @property
    def over_budget(self) -> bool:
        return self.queued_bytes > self.budget

    def put(self, frame: bytes) -> bool:
        """Queue one frame; False only if the channel is full.

        A viewer whose writer has gone (it is leaving) is marked ENDED and the
        frame discarded: that is not a drop, its handler is removing it.
        """
        try:
            self.send_channel.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.state = SubscriberState.ENDED
            return True
        self.queued_bytes += len(frame)
        self.bytes_queued_total += len(frame)
        self.frames_queued += 1
        return True

    def written(self, nbytes: int) -> None:
        """Called by the viewer's writer once ``nbytes`` left the relay."""
        self.queued_bytes -= nbytes
        self.bytes_written += nbytes

    def dropped(self, header: BatchHeader) -> None:
        self.batches_dropped += 1
        self.records_dropped += header.count
        if (
            self.records_offered >= self.min_records
            and self.records_dropped > self.max_loss * self.records_offered
        ):
            self.too_lossy.set()

    def end(self, message: StreamEnd | Close) -> None:
        """Queue the final frame and close the channel (idempotent)."""
        if self.state is SubscriberState.ENDED:
            return
        self.state = SubscriberState.ENDED
        # The last frame must get through even over budget: it is tiny and
        # the viewer needs it to tell an end from a failure.
        self.put(encode_message(message))
        self.send_channel.close()


class FrameSink(Protocol):
    """Another consumer of a session's frames (a cluster feed to another relay)."""

    #: Its viewers: our viewer ids (as the agent knows them) → theirs.
    ids: dict[int, int]

    def on_batch(self, header: BatchHeader, frame: bytes) -> None: ...

    def on_gap(self, gap: GapNotice) -> None: ...

    def restart(self) -> None: ...

    def end(self, code: ErrorCode, reason: str, last_seq: int) -> None: ...


@attrs.define(eq=False)
class Hub:
    """The subscribers of one session and the routing of its agent's frames.

    Args:
      request_sync: called (synchronously) when a subscriber needs a sync point.
    """

    request_sync: Callable[[], None]
    #: How log lines name this hub's session.
    name: str = "session"
    subscribers: dict[int, Subscriber] = attrs.Factory(dict)
    records_dropped: int = 0
    raw_bytes_in: int = 0
    gaps_by_reason: dict[str, int] = attrs.Factory(dict)
    bytes_out: int = 0
    #: The highest seq covered by the live stream so far.
    last_seq: int = 0
    batches_in: int = 0
    bytes_in: int = 0
    records_in: int = 0
    batches_dropped: int = 0
    gaps_sent: int = 0
    #: Cluster feeds (by watching relay), given every frame after the viewers.
    feeds: dict[str, FrameSink] = attrs.Factory(dict)

    def _dropped(self, sub: Subscriber, header: BatchHeader) -> None:
        sub.dropped(header)
        self.batches_dropped += 1
        self.records_dropped += header.count

    def _skip(self, sub: Subscriber, from_seq: int) -> None:
        log.warning(
            "%s: viewer %d is behind (%d bytes queued, budget %d): skipping to the next sync point",
            self.name,
            sub.id,
            sub.queued_bytes,
            sub.budget,
        )
        sub.state = SubscriberState.SKIPPING
        sub.sync_asked = False
        sub.skip_from = from_seq
        sub.skipping_since = trio.current_time()
        self.request_sync()

    def _gap(self, sub: Subscriber, first: int, last: int, reason: str) -> None:
        if last < first:
            return
        sub.put(encode_message(GapNotice(first_seq=first, last_seq=last, reason=reason)))
        sub.gaps += 1
        self._count_gap(reason)
        sub.last_seq = max(sub.last_seq, last)

    def _count_gap(self, reason: str) -> None:
        self.gaps_sent += 1
        self.gaps_by_reason[reason] = self.gaps_by_reason.get(reason, 0) + 1

    def on_batch(self, header: BatchHeader, frame: bytes) -> None:
        """Route one BATCH frame (``frame`` is the whole encoded frame)."""
        self.batches_in += 1
        self.bytes_in += len(frame)
        self.raw_bytes_in += header.raw_len
        self.records_in += header.count
        if not header.history:
            self.last_seq = max(self.last_seq, header.last_seq)
        for feed in self.feeds.values():
            feed.on_batch(header, frame)
        if header.history:
            sub = self.subscribers.get(header.viewer)
            if sub is not None and sub.state is SubscriberState.PENDING:
                sub.put(frame)
                sub.last_seq = header.last_seq
                if header.history_end:
                    sub.state = SubscriberState.WAIT_SYNC
            return
        # An empty sync batch right after what a viewer has (the agent had
        # nothing new when a sync point was asked for) still starts a new
        # compression context: it must reach live viewers too.
        empty_sync = header.sync and header.count == 0 and header.last_seq < header.first_seq
        for sub in self.subscribers.values():
            state = sub.state
            if state is not SubscriberState.PENDING and header.last_seq > sub.last_seq:
                sub.records_offered += header.count
            stale = header.last_seq <= sub.last_seq and not (
                empty_sync and header.first_seq == sub.last_seq + 1
            )
            if state is SubscriberState.LIVE:
                if stale:
                    continue
                if sub.over_budget or not sub.put(frame):
                    self._skip(sub, max(header.first_seq, sub.last_seq + 1))
                    self._dropped(sub, header)
                else:
                    sub.last_seq = header.last_seq
            elif state is SubscriberState.WAIT_SYNC:
                if stale:
                    continue
                if header.sync:
                    self._start_live(sub, header, frame, GAP_STREAM_RESTART)
                else:
                    # The agent owes this viewer a sync point right after its
                    # history; a batch that is not one cannot be decoded.
                    self._skip(sub, sub.last_seq + 1)
                    self._dropped(sub, header)
            elif state is SubscriberState.SKIPPING:
                if header.sync and sub.queued_bytes <= sub.budget // 2:
                    self._start_live(sub, header, frame, GAP_VIEWER_SLOW)
                else:
                    self._dropped(sub, header)

    def _start_live(self, sub: Subscriber, header: BatchHeader, frame: bytes, reason: str) -> None:
        first_missing = sub.skip_from if sub.state is SubscriberState.SKIPPING else sub.last_seq + 1
        if sub.state is SubscriberState.SKIPPING:
            log.info(
                "%s: viewer %d caught up at seq %d; lost seqs %d-%d (%s)",
                self.name,
                sub.id,
                header.first_seq,
                first_missing,
                header.first_seq - 1,
                reason,
            )
        self._gap(sub, first_missing, header.first_seq - 1, reason)
        if sub.put(frame):
            sub.state = SubscriberState.LIVE
            sub.skipping_since = math.inf
            sub.last_seq = header.last_seq
        else:
            self._skip(sub, header.first_seq)

    def on_gap(self, gap: GapNotice) -> None:
        """Route an agent's GAP (its buffer dropped records before sending)."""
        for feed in self.feeds.values():
            feed.on_gap(gap)
        frame = encode_message(GapNotice(first_seq=gap.first_seq, last_seq=gap.last_seq, reason=gap.reason))
        if gap.viewer:
            sub = self.subscribers.get(gap.viewer)
            if sub is not None and sub.state is SubscriberState.PENDING:
                sub.put(frame)
                sub.gaps += 1
                self._count_gap(gap.reason)
            return
        for sub in self.subscribers.values():
            if sub.state in (SubscriberState.LIVE, SubscriberState.WAIT_SYNC):
                if gap.last_seq > sub.last_seq:
                    sub.put(frame)
                    sub.gaps += 1
                    self._count_gap(gap.reason)
                    sub.last_seq = gap.last_seq
            # SKIPPING viewers get one GAP covering everything they missed.

    def disconnect_slow(self, sub: Subscriber, reason: str) -> None:
        """End a slow viewer's stream: what it lost, then CLOSE ``slow_consumer``.

        What is already queued still goes out (within the send deadline), so a
        viewer that resumes reading learns exactly which seqs it lost and why.
        """
        if sub.state is SubscriberState.SKIPPING:
            self._gap(sub, sub.skip_from, self.last_seq, GAP_VIEWER_SLOW)
        sub.end(Close(code=ErrorCode.SLOW_CONSUMER, reason=reason))

    def restart(self, sub: Subscriber) -> AddViewer:
        """The stream this viewer followed broke: ask again from where it was.

        Returns the ADD_VIEWER to send to the agent.
        """
        if sub.state in (SubscriberState.LIVE, SubscriberState.WAIT_SYNC):
            sub.request = AddViewer(
                viewer=sub.id,
                min_level=sub.request.min_level,
                after_seq=sub.last_seq,
            )
        elif sub.state is SubscriberState.SKIPPING:
            sub.request = AddViewer(
                viewer=sub.id,
                min_level=sub.request.min_level,
                after_seq=sub.skip_from - 1,
            )
        sub.state = SubscriberState.PENDING
        sub.skipping_since = math.inf
        return sub.request

    def end_all(self, code: ErrorCode, reason: str, last_seq: int = 0) -> None:
        """End every subscriber's stream (after what is already queued)."""
        for sub in list(self.subscribers.values()):
            sub.end(StreamEnd(code=code, reason=reason, last_seq=last_seq or sub.last_seq))

    @property
    def queued_bytes(self) -> int:
        return sum(sub.queued_bytes for sub in self.subscribers.values())

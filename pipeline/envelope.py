"""The frame envelope: what every message derived from one frame carries, and the frame's completion handle.

A frame's identity (stream, index, capture time), its journey (sent / received times, per-stage timings), its
run (``session``, set by the server's receive stage) and its :class:`Completion` travel in one
:class:`FrameMeta`. Frame, Packet, Features, FrameResult and ResultRecord hold it as ``meta`` (their ``stream``,
``index``, ``capture_ns``, ... are read-only views of it), so no message re-declares these fields and nothing
has to copy them by position.

The completion handle is how a frame's end-to-end acknowledgement travels, instead of a side channel between
stages: the transport's receive stage creates it bound to its session's acknowledgements; a stage that
``commits`` (the JSONL sink) calls :meth:`FrameMeta.commit` once the frame is durably written; the graph runtime
calls :meth:`FrameMeta.lose` when it drops the message or a stage loses it, and :meth:`FrameMeta.abandon` when a
failing stage stops the graph on it. Exactly-once replay rests on it: a replay frame is acknowledged only after
every committing stage wrote it (or after it was given up as lost), so a server restart redoes what was not.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Callable

COMMITTED, LOST = "committed", "lost"


class Completion:
    """One frame's acknowledgement: finished once, by ``needed`` commits or by one loss, whichever comes first.

    ``ack(lost)`` is called exactly once, from whichever thread finished the frame (``lost``: no committing stage
    will write it; it is acknowledged anyway so that the sender does not resend it for ever and its credit comes
    back). ``resend``: the sender keeps the frame until acknowledged and resends it to the next server (a replay
    stream); :meth:`abandon` leaves such a frame unacknowledged instead of losing it. Thread-safe."""

    def __init__(self, ack: Callable[[bool], None], needed: int = 1, resend: bool = True):
        self._ack = ack
        self.needed = max(1, int(needed))
        self.resend = bool(resend)
        self.commits = 0
        self.outcome: str | None = None  # COMMITTED or LOST once finished
        self.reason: str | None = None  # why it was lost or abandoned
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """Whether the frame is finished (acknowledged)."""
        return self.outcome is not None

    def commit(self) -> bool:
        """One committing stage has durably written the frame; the ack goes out with the last of ``needed``.
        Returns whether this call finished the frame."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.commits += 1
            if self.commits < self.needed:
                return False
            self.outcome = COMMITTED
        self._ack(False)
        return True

    def lose(self, reason: str) -> bool:
        """The frame will never be written (dropped, lost by a stage, undecodable): acknowledge it as lost.
        Returns whether this call finished the frame."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome, self.reason = LOST, reason
        self._ack(True)
        return True

    def abandon(self, reason: str) -> bool:
        """A stage failed on the frame and the graph stops: a frame the sender resends stays unacknowledged
        (the next server does it, exactly once); one it never resends is lost (its credit comes back)."""
        if not self.resend:
            return self.lose(reason)
        with self._lock:
            if self.outcome is None:
                self.reason = reason
        return False


@dataclass
class FrameMeta:
    """Everything known about one frame that is not its content: the envelope every derived message carries.

    ``live``: a message that may be dropped on a full queue (bounded latency) rather than wait (lossless).
    ``timings``: stage name -> milliseconds. ``sent_ns`` / ``received_ns``: wall clock (ns) when the edge sent it
    and the server received it (0: not yet). ``session``: the edge run the frame belongs to (None outside a
    server). ``completion``: its acknowledgement handle (None when nobody waits for one)."""
    stream: int
    index: int
    capture_ns: int = 0
    live: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    sent_ns: int = 0
    received_ns: int = 0
    session: str | None = None
    completion: Completion | None = field(default=None, repr=False, compare=False)

    def derive(self, **changes) -> "FrameMeta":
        """The envelope of a message derived from this one: the same frame and completion handle, its own copy
        of ``timings`` (stages downstream add theirs without touching the earlier message's)."""
        changes.setdefault("timings", dict(self.timings))
        return dataclasses.replace(self, **changes)

    def commit(self) -> bool:
        """A committing stage wrote the frame durably (see :meth:`Completion.commit`); no-op without a handle."""
        return self.completion.commit() if self.completion is not None else False

    def lose(self, reason: str) -> bool:
        """The frame will not be written (see :meth:`Completion.lose`); no-op without a handle."""
        return self.completion.lose(reason) if self.completion is not None else False

    def abandon(self, reason: str) -> bool:
        """A stage failed on the frame (see :meth:`Completion.abandon`); no-op without a handle."""
        return self.completion.abandon(reason) if self.completion is not None else False


def meta_of(msg) -> FrameMeta | None:
    """The envelope of a message (its ``meta``), or None for messages without one (EndOfStream, plugins')."""
    meta = getattr(msg, "meta", None)
    return meta if isinstance(meta, FrameMeta) else None

"""The server session's record of runs and finished frames: what it acknowledges, and where a run resumes.

:class:`RunLedger` is the interface the transport owns between a :class:`transport.server_session.ServerSession` and
whatever finishes frames. The session registers each run (``next_for``, ``run_info``, ``end``, ``forget``,
``owner_of``) and each accepted frame (``admit``); whoever finishes a frame calls ``done`` (in a pipeline, the
frame's completion handle does), which queues its acknowledgement on :attr:`RunLedger.queue` for the session to
send. This class keeps everything in memory (a server restart starts afresh); a durable journal subclasses it
and overrides the persistence hooks (``stages.commitlog.CommitLog``: the JSONL sink's rows and a state file),
so that nothing under transport/ knows the result format.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Any


class RunLedger:
    """Runs per stream (the edge session that opened it, its owner, its replay source, whether it ended) and the
    last finished frame of each, shared by the receive stage and whatever finishes frames (thread-safe).

    Each accepted frame is registered with its run (:meth:`admit`); :meth:`session_of` tells which run a frame
    belongs to, and :meth:`done` queues ``(stream, index, run)`` so that a frame of an earlier run still in
    flight never counts for the current one. Persistence hooks: :meth:`_save` (a run record changed) and
    :meth:`_new_run` (extra fields of a new run's record); both do nothing here."""

    MAX_ADMITTED = 1 << 16  # frames registered and not yet done (a frame lost inside the graph is forgotten)

    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[tuple[int, int, str | None]]" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.sessions: dict[int, dict[str, Any]] = {}
        self.finished: dict[int, int] = {}  # stream -> last finished frame index of its current session
        self.admitted: OrderedDict[tuple[int, int], str] = OrderedDict()  # (stream, index) -> run, until done

    # ------------------------------------------------------------------ persistence hooks
    def _save(self) -> None:
        """A run record changed (called with :attr:`lock` held): a durable ledger writes it down."""

    def _new_run(self) -> dict[str, Any]:
        """Extra fields for a new run's record (called with :attr:`lock` held), e.g. where its rows start."""
        return {}

    # ------------------------------------------------------------------ runs
    @property
    def resumable(self) -> bool:
        """Whether runs were recorded (a durable ledger: read back from an earlier server)."""
        return bool(self.sessions)

    def next_for(self, stream: int, session: str, owner: str | None = None, source: str | None = None) -> int:
        """The first frame index a (re)connecting edge session still has to deliver; records a new run (session),
        its owner (the CURVE key, or the session without keys) and its replay source."""
        with self.lock:
            info = self.sessions.get(stream)
            if info is not None and info.get("session") == session:
                changed = False
                for k, v in (("owner", owner), ("source", source)):
                    if v is not None and info.get(k) != v:
                        info[k], changed = v, True
                if changed:
                    self._save()
                return self.finished.get(stream, -1) + 1
            self.sessions[stream] = {"session": session, **self._new_run()}
            if owner is not None:
                self.sessions[stream]["owner"] = owner
            if source is not None:
                self.sessions[stream]["source"] = source
            self.finished[stream] = -1
            self._save()
            return 0

    def run_info(self, stream: int) -> dict[str, Any] | None:
        """The recorded run of ``stream`` (``session``, ``owner``, ``source``, ``ended``, ``next``: the first
        frame not finished), or None. A durable ledger keeps it across a server restart."""
        with self.lock:
            info = self.sessions.get(stream)
            if not isinstance(info, dict) or not isinstance(info.get("session"), str):
                return None
            out = {k: info.get(k) for k in ("session", "owner", "source")}
            out["ended"] = bool(info.get("ended"))
            out["next"] = self.finished.get(stream, -1) + 1
            return out

    def end(self, stream: int, session: str) -> None:
        """The run ``session`` of ``stream`` ended (its end-of-stream acknowledged): a later edge session on the
        same source starts a new run instead of continuing this one."""
        with self.lock:
            info = self.sessions.get(stream)
            if info is not None and info.get("session") == session and not info.get("ended"):
                info["ended"] = True
                self._save()

    def forget(self, stream: int, session: str) -> bool:
        """Drop the record of run ``session`` of ``stream`` if it has no finished frame (a stream slot reclaimed
        before its first frame finished): what a flood of hellos leaves behind does not grow the record."""
        with self.lock:
            info = self.sessions.get(stream)
            if info is None or info.get("session") != session or self.finished.get(stream, -1) >= 0:
                return False
            del self.sessions[stream]
            self.finished.pop(stream, None)
            self._save()
            return True

    def owner_of(self, stream: int) -> str | None:
        """Who owned ``stream`` last (a durable ledger keeps it across a server restart), or None."""
        with self.lock:
            info = self.sessions.get(stream)
            owner = info.get("owner") if isinstance(info, dict) else None
            return owner if isinstance(owner, str) else None

    # ------------------------------------------------------------------ frames
    def admit(self, stream: int, index: int, session: str) -> None:
        """Frame ``index`` of ``stream`` was accepted for run ``session`` (until :meth:`done`)."""
        with self.lock:
            self.admitted[(stream, index)] = session
            if len(self.admitted) > self.MAX_ADMITTED:
                self.admitted.popitem(last=False)

    def session_of(self, stream: int, index: int) -> str | None:
        """The run (edge session id) frame ``index`` of ``stream`` belongs to: what a row's ``session`` says, so
        that a reader can tell runs apart. None when unknown."""
        with self.lock:
            run = self.admitted.get((stream, index))
            if run is None:
                info = self.sessions.get(stream)
                run = info.get("session") if isinstance(info, dict) else None
            return run

    def done(self, stream: int, index: int) -> None:
        """Frame ``index`` of ``stream`` is finished (its row written, or it has none): queue its ack."""
        with self.lock:
            run = self.admitted.pop((stream, index), None)
            info = self.sessions.get(stream)
            current = run is None or info is None or info.get("session") == run
            if current and index > self.finished.get(stream, -1):
                self.finished[stream] = index
        self.queue.put((stream, index, run))

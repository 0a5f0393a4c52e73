"""The JSONL sink's journal: the server's durable record of finished frames (what a restart resumes from).

:class:`CommitLog` is a :class:`transport.runs.RunLedger` (the interface the server session uses to register runs
and send acknowledgements) kept beside the JSONL file it describes: ``PATH.state.json`` records, per stream, its
current **run** (the edge session that opened it; a restarted edge on the same source continues it under that
id), its owner, its replay source, whether it ended, and the byte offset where its rows start in the JSONL. On
open with ``resume``, the JSONL is read back from there to learn the last finished frame of each stream (a torn
last line is cut off), so the edges are told to resume after it. It lives here, not under transport/, because
it parses result rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transport.runs import RunLedger


class CommitLog(RunLedger):
    """A RunLedger persisted beside a JSONL file (``path``). The sink calls :meth:`wrote` after each line it
    writes (so new runs know where their rows start); ``resume``: read back an earlier server's state and rows,
    and keep the state file up to date (otherwise nothing is persisted)."""

    def __init__(self, path: str | Path | None = None, resume: bool = False):
        super().__init__()
        self.path = Path(path) if path is not None else None
        self.persist = bool(resume)
        self.state_path = self.path.with_name(self.path.name + ".state.json") if self.path else None
        self.offset = 0  # bytes of the JSONL written so far (where a new run's rows start)
        if self.path is not None and resume and self.state_path.is_file() and self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            st = json.loads(self.state_path.read_text())
            self.sessions = {int(k): v for k, v in st.get("streams", {}).items()}
        except (ValueError, OSError, AttributeError):
            self.sessions = {}
            return
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut != len(data):  # a line torn by a crash: drop it, the frame is processed again
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
        self.offset = len(data)
        for s, info in self.sessions.items():
            start = int(info.get("offset", 0))
            last = -1
            for line in data[start:].splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("stream") == s:
                    last = max(last, int(row.get("frame", -1)))
            self.finished[s] = last

    def _new_run(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def _save(self) -> None:
        if self.state_path is None or not self.persist:
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps({"streams": {str(k): v for k, v in self.sessions.items()}}))
        tmp.replace(self.state_path)

    def wrote(self, nbytes: int) -> None:
        """The sink appended ``nbytes`` bytes (one row) to the JSONL."""
        with self.lock:
            self.offset += nbytes

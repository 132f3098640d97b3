"""Verdict cache keyed by the content hash of (judge id, conversation, answer A, answer B,
reference), on disk (sqlite), so a redelivered message does not pay for its verdict twice.
Bounded: it keeps at most `max_entries`, dropping the oldest (a dropped verdict only costs a
repeat call if that exact pair comes back)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from shared.ids import content_id
from shared.wire import ChatMessage, PairVerdict


def verdict_key(judge_id: str, conversation: list[ChatMessage], a: str, b: str, reference: str | None) -> str:
    return content_id("vrd", {"judge": judge_id, "conversation": [m.model_dump() for m in conversation],
                              "a": a, "b": b, "reference": reference})


class VerdictCache:
    def __init__(self, path: str | Path, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: str) -> PairVerdict | None:
        with self._lock:
            row = self._db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self.hits += 1
        return PairVerdict.model_validate_json(row[0])

    def put(self, key: str, verdict: PairVerdict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts (key, verdict) VALUES (?, ?)",
                             (key, verdict.model_dump_json()))
            # rowids grow with every insert (a replace gets a new one), so these are the oldest
            self._db.execute("DELETE FROM verdicts WHERE rowid <= (SELECT MAX(rowid) FROM verdicts) - ?",
                             (self.max_entries,))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

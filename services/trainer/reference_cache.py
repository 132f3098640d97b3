"""What prefloop's DPO loop measures once per version and keeps on disk (services/trainer/lean_dpo.py)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class ReferenceCache:
    """Reference log-probs by (reference version, pair id): computed once, reused by every replay. And the
    drift monitor's perplexity by (version, monitor key): a version's is measured once, by the round that
    made it (its last kept check), and is the next round's start (`DriftBudget`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS ref (parent TEXT, pair TEXT, chosen REAL, rejected REAL, "
                         "PRIMARY KEY (parent, pair))")
        self._db.execute("CREATE TABLE IF NOT EXISTS monitor (version TEXT, key TEXT, value REAL, "
                         "PRIMARY KEY (version, key))")
        self._lock = threading.Lock()

    def perplexity(self, version: str, key: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM monitor WHERE version = ? AND key = ?", (version, key)).fetchone()
        return row[0] if row else None

    def put_perplexity(self, version: str, key: str, value: float) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO monitor VALUES (?, ?, ?)", (version, key, value))

    def get(self, parent: str, pairs: list[str]) -> dict[str, tuple[float, float]]:
        with self._lock:
            rows = self._db.execute(f"SELECT pair, chosen, rejected FROM ref WHERE parent = ? AND pair IN "
                                    f"({','.join('?' * len(pairs))})", (parent, *pairs)).fetchall() if pairs else []
        return {p: (c, r) for p, c, r in rows}

    def put(self, parent: str, values: dict[str, tuple[float, float]]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO ref VALUES (?, ?, ?, ?)",
                                 [(parent, p, c, r) for p, (c, r) in values.items()])

    def close(self) -> None:
        self._db.close()

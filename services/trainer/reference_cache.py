"""What prefloop's DPO loop measures once per version and keeps on disk (services/trainer/lean_dpo.py)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class ReferenceCache:
    """Reference log-probs by (reference version, pair id): computed once, reused by every replay."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS ref (parent TEXT, pair TEXT, chosen REAL, rejected REAL, "
                         "PRIMARY KEY (parent, pair))")
        self._lock = threading.Lock()

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

"""The durable preference ledger: append-only JSON-lines segments, fsynced, keyed by the
pair id (a content hash), so a redelivered preference is recognised and dropped.

The consume loop commits offsets only after `append` returned, i.e. after the fsync.
A torn last line (a crash mid-write) is detected on open and cut off; its record was not
committed, so Kafka delivers it again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from shared.ids import content_id
from shared.wire import PreferenceEvent

log = logging.getLogger(__name__)
SEGMENT_LINES = 10_000


class PreferenceLedger:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "segments").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._ids: set[str] = set()
        self._order: list[str] = []
        self._split: dict[str, str] = {}
        self._segment: Path | None = None
        self._segment_lines = 0
        self._load()

    def _segments(self) -> list[Path]:
        return sorted((self.root / "segments").glob("*.jsonl"))

    def _load(self) -> None:
        for seg in self._segments():
            good_bytes, lines = 0, 0
            with open(seg, "rb") as f:
                for raw in f:
                    try:
                        row = json.loads(raw)
                        pair_id, split = row["id"], row.get("split", "train")
                    except (ValueError, KeyError):
                        log.warning("ledger %s: cutting a torn record at byte %d", seg.name, good_bytes)
                        break
                    good_bytes += len(raw)
                    lines += 1
                    if pair_id not in self._ids:
                        self._ids.add(pair_id)
                        self._order.append(pair_id)
                        self._split[pair_id] = split
            if good_bytes != seg.stat().st_size:
                with open(seg, "r+b") as f:
                    f.truncate(good_bytes)
                    os.fsync(f.fileno())
            self._segment, self._segment_lines = seg, lines

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, pair_id: str) -> bool:
        return pair_id in self._ids

    @property
    def ids(self) -> list[str]:
        """Pair ids in arrival order."""
        return list(self._order)

    def split_of(self, pair_id: str) -> str:
        return self._split[pair_id]

    def append(self, events: Iterable[PreferenceEvent]) -> int:
        """Durably append the events not seen before. Returns how many were new."""
        with self._lock:
            fresh: dict[str, PreferenceEvent] = {}
            for e in events:
                if e.id not in self._ids and e.id not in fresh:
                    fresh[e.id] = e
            if not fresh:
                return 0
            if self._segment is None or self._segment_lines >= SEGMENT_LINES:
                self._segment = self.root / "segments" / f"{len(self._segments()):06d}.jsonl"
                self._segment_lines = 0
            with open(self._segment, "a") as f:
                for e in fresh.values():
                    f.write(e.model_dump_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._ids.update(fresh)
            self._order.extend(fresh)
            self._split.update({i: e.split for i, e in fresh.items()})
            self._segment_lines += len(fresh)
            return len(fresh)

    def events(self, ids: Iterable[str] | None = None) -> list[PreferenceEvent]:
        wanted = set(ids) if ids is not None else None
        out: dict[str, PreferenceEvent] = {}
        for seg in self._segments():
            with open(seg) as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        e = PreferenceEvent.model_validate_json(line)
                    except ValueError:
                        continue  # a torn tail not yet cut (another process is writing)
                    if (wanted is None or e.id in wanted) and e.id not in out:
                        out[e.id] = e
        return list(out.values())

    # -- snapshots -------------------------------------------------------------
    def snapshot(self, ids: Iterable[str]) -> str:
        """Record exactly which pair ids a run used; returns the snapshot id."""
        ordered = sorted(set(ids))
        snap = content_id("snap", ordered, 24)
        path = self.root / "snapshots" / f"{snap}.json"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"snapshot_id": snap, "pair_ids": ordered}))
            os.replace(tmp, path)
        return snap

    def snapshot_ids(self, snapshot_id: str) -> list[str]:
        return json.loads((self.root / "snapshots" / f"{snapshot_id}.json").read_text())["pair_ids"]

    def export(self, path: str | Path, ids: Iterable[str] | None = None) -> Path:
        """A `datasets`-loadable JSONL with TRL's conversational columns plus provenance."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for e in self.events(ids):
                f.write(json.dumps(to_trl_row(e)) + "\n")
        return path


def to_trl_row(e: PreferenceEvent) -> dict:
    return {
        "prompt": [m.model_dump() for m in e.prompt_messages],
        "chosen": [{"role": "assistant", "content": e.chosen}],
        "rejected": [{"role": "assistant", "content": e.rejected}],
        "pair_id": e.id, "prompt_id": e.prompt_id, "source": e.source, "judge_id": e.judge_id,
        "policy_version": e.policy_version, "split": e.split,
    }

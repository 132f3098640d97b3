"""The durable preference ledger: append-only JSON-lines segments, fsynced, keyed by the
pair id (a content hash), so a redelivered preference is recognised and dropped.

The consume loop commits offsets only after `append` returned, i.e. after the fsync.
A torn last line (a crash mid-write) is detected on open and cut off; its record was not
committed, so Kafka delivers it again. An unreadable line anywhere else (a bad disk block, a
hand edit) is not a torn write: it is logged, listed in `skipped` and left out, and every line
after it is kept. `events()` reads with the same rules, so it agrees with `ids`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import ValidationError

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
        self.skipped: list[str] = []
        """Unreadable lines skipped on open (`segment:line: reason`), not counting a torn tail."""
        self._load()

    def _segments(self) -> list[Path]:
        return sorted((self.root / "segments").glob("*.jsonl"))

    def _load(self) -> None:
        for seg in self._segments():
            lines = 0
            for _, event in self._read(seg, report=True):
                lines += 1
                if event.id not in self._ids:
                    self._ids.add(event.id)
                    self._order.append(event.id)
                    self._split[event.id] = event.split
            self._segment, self._segment_lines = seg, lines

    def _read(self, seg: Path, report: bool = False) -> Iterator[tuple[int, PreferenceEvent]]:
        """(line number, event) of each readable line. With `report` (on open, before any append):
        cut a torn last line off the file and note unreadable lines elsewhere in `skipped`."""
        with open(seg, "rb") as f:
            raw_lines = f.read().splitlines(keepends=True)
        end = 0
        for number, raw in enumerate(raw_lines, 1):
            try:
                event = PreferenceEvent.model_validate_json(raw) if raw.strip() else None
            except ValidationError as exc:
                if number == len(raw_lines):  # a crash mid-append: never fsynced, so never committed
                    if report:
                        log.warning("ledger %s: cutting a torn last line at byte %d", seg.name, end)
                        self._truncate(seg, end)
                    return
                if report:
                    reason = str(exc).splitlines()[0][:200]
                    self.skipped.append(f"{seg.name}:{number}: {reason}")
                    log.error("ledger %s:%d: skipping an unreadable line (%s); the lines after it are kept",
                              seg.name, number, reason)
                event = None
            end += len(raw)
            if event is not None:
                yield number, event
        if report and raw_lines and not raw_lines[-1].endswith(b"\n"):
            with open(seg, "ab") as f:  # a complete last record without its newline: finish the line
                f.write(b"\n")
                os.fsync(f.fileno())

    @staticmethod
    def _truncate(seg: Path, size: int) -> None:
        with open(seg, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())

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
            for _, e in self._read(seg):  # a torn tail another process is still writing is skipped too
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
        "chosen_cut": e.chosen_cut, "rejected_cut": e.rejected_cut,
    }

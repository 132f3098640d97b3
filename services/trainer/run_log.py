"""The trainer's run history: `runs.jsonl`, append-only, the last record of a run id wins."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from shared.wire import RunRecord

log = logging.getLogger(__name__)


class RunLog:
    """Every state of every run, one fsync'd line each: a restarted trainer reads which pairs were used up
    and which runs a crash left `running`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists() and path.read_bytes()[-1:] not in (b"", b"\n"):
            with open(path, "ab") as f:  # a torn last record: later records start a line of their own
                f.write(b"\n")

    def runs(self) -> list[RunRecord]:
        if not self.path.exists():
            return []
        latest: dict[str, RunRecord] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = RunRecord.model_validate_json(line) if line.strip() else None
            except ValueError:  # a torn last record (a crash mid-write); its run shows as running or failed
                log.warning("%s:%d: skipping an unreadable run record", self.path, number)
                continue
            if record is not None:
                latest[record.run_id] = record
        return list(latest.values())

    def record(self, record: RunRecord) -> None:
        with open(self.path, "a") as f:
            f.write(record.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())


class Phases(dict):
    """Seconds per step of one run, in order (`RunRecord.phases`)."""

    def timed(self, name: str, fn, *args, **kwargs):
        begun = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self[name] = round(time.monotonic() - begun, 1)

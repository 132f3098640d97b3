"""Whether the trainer may start a run by itself: exponential back-off after failed runs, and a
halt after `max_consecutive_failures` of them in a row. Derived from the run history
(`runs.jsonl`) alone, so a restart neither forgets the back-off nor resets the count.

A promoted or rejected run ends a streak of failures (the pipeline works; the gate decides); so
does a run an operator started with `POST /train`, which is also the way out of a halt.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from services.trainer.settings import TrainerSettings
from shared.wire import RunRecord, TriggerStatus

OPERATOR_TRIGGER = "POST /train"


def backoff_s(failures: int, settings: TrainerSettings) -> float:
    """Wait after `failures` (>= 1) consecutive failed runs: base, 2 x base, 4 x base ... up to the max."""
    return min(settings.failure_backoff_s * 2 ** (failures - 1), settings.failure_backoff_max_s)


def trigger_status(runs: list[RunRecord], settings: TrainerSettings, busy: bool,
                   now: datetime | None = None) -> TriggerStatus:
    failures, last_error, last_failed = 0, None, None
    for run in sorted((r for r in runs if r.status != "running"), key=lambda r: r.started):
        if run.status in ("promoted", "rejected") or run.trigger == OPERATOR_TRIGGER:
            failures = 0
        if run.status == "failed":
            failures, last_error, last_failed = failures + 1, run.error, run.finished or run.started
    limit = settings.max_consecutive_failures
    common = dict(consecutive_failures=failures, max_consecutive_failures=limit,
                  last_error=last_error if failures else None)
    if busy:
        return TriggerStatus(state="training", detail="a run is in progress", **common)
    if failures >= limit:
        return TriggerStatus(state="halted", detail=f"automatic training stopped after {failures} consecutive failed "
                             f"runs; fix the cause, then POST /train (that run resets the count)", **common)
    if failures:
        at = last_failed + timedelta(seconds=backoff_s(failures, settings))
        if (now or datetime.now(timezone.utc)) < at:
            return TriggerStatus(state="backing_off", next_attempt_at=at,
                                 detail=f"{failures} consecutive failed runs: no automatic run before "
                                        f"{at.isoformat(timespec='seconds')}", **common)
    return TriggerStatus(state="idle", **common)

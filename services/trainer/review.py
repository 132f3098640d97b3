"""The review queue: pairs the judge abstained on, settled by people in the console.

The trainer consumes the abstentions topic into `review.sqlite` (one row per abstention id, so a
redelivery is harmless). Version-2 abstentions carry the conversation and the two answers in
question; those are the queue. A reviewer sees them in an order drawn from (item, reviewer), so a
reload shows the same order and the judge's leaning stays hidden. A pick becomes a PreferenceEvent
with source `human`, queued in the review outbox (sqlite) and relayed to the preferences topic, from
where the trainer's own consume loop appends it to the ledger like any other label. "neither" is
recorded and never trained on. One decision per (item, reviewer): the same decision again is
answered as a duplicate, a different one is refused. An item leaves the queue once anyone settled it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from shared.console_wire import Pick, ReviewDecision, ReviewDecisionRequest, ReviewerStats, ReviewItem, ReviewQueue, \
    ReviewStats
from shared.ids import content_id
from shared.kafka import Received
from shared.outbox import Outbox
from shared.topics import Topic
from shared.wire import JudgementAbstainedEvent, PreferenceEvent

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS abstentions (id TEXT PRIMARY KEY, created_at TEXT NOT NULL, reason TEXT NOT NULL,
                                        reviewable INTEGER NOT NULL, event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS abstentions_created ON abstentions (created_at);
CREATE TABLE IF NOT EXISTS decisions (item_id TEXT NOT NULL, reviewer TEXT NOT NULL, pick TEXT NOT NULL,
                                      preference_id TEXT, agrees INTEGER, decided_at TEXT NOT NULL
                                      DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (item_id, reviewer));
"""


class ConsoleError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def shown_order(item_id: str, reviewer: str) -> tuple[int, int]:
    """Indexes into the abstention's `answers` shown as (a, b): a fixed draw per item and reviewer."""
    return (1, 0) if int(content_id("ord", [item_id, reviewer], 8)[-8:], 16) % 2 else (0, 1)


class ReviewStore:
    def __init__(self, path: str | Path, outbox: Outbox, preferences: Topic) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._outbox, self._preferences = outbox, preferences
        self._lock = threading.Lock()
        self._deciding = threading.Lock()  # one decision at a time: check, queue and record together
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    # -- intake (the abstentions consume loop) --------------------------------
    def handle(self, batch: list[Received[JudgementAbstainedEvent]]) -> None:
        rows = [(r.event.id, r.event.created_at.isoformat(), r.event.reason, int(len(r.event.answers) == 2),
                 r.event.model_dump_json()) for r in batch]
        with self._lock, self._db:
            self._db.executemany("INSERT OR IGNORE INTO abstentions VALUES (?, ?, ?, ?, ?)", rows)
        log.info("review queue: %d abstentions received (%d reviewable)", len(rows), sum(r[3] for r in rows))

    def abstentions(self) -> list[JudgementAbstainedEvent]:
        with self._lock:
            rows = self._db.execute("SELECT event FROM abstentions ORDER BY created_at").fetchall()
        return [JudgementAbstainedEvent.model_validate_json(e) for (e,) in rows]

    def _item(self, item_id: str) -> JudgementAbstainedEvent:
        with self._lock:
            row = self._db.execute("SELECT event FROM abstentions WHERE id = ? AND reviewable = 1",
                                   (item_id,)).fetchone()
        if row is None:
            raise ConsoleError(404, f"no reviewable abstention {item_id!r}")
        return JudgementAbstainedEvent.model_validate_json(row[0])

    # -- the queue -----------------------------------------------------------
    _UNSETTLED = "reviewable = 1 AND id NOT IN (SELECT item_id FROM decisions)"

    def queue(self, reviewer: str, limit: int) -> ReviewQueue:
        with self._lock:
            pending = self._db.execute(f"SELECT COUNT(*) FROM abstentions WHERE {self._UNSETTLED}").fetchone()[0]
            rows = self._db.execute(f"SELECT event FROM abstentions WHERE {self._UNSETTLED} ORDER BY created_at, id "
                                    "LIMIT ?", (limit,)).fetchall()
        items = []
        for (text,) in rows:
            e = JudgementAbstainedEvent.model_validate_json(text)
            first, second = shown_order(e.id, reviewer)
            items.append(ReviewItem(item_id=e.id, reason=e.reason, detail=e.detail[:500], prompt=e.prompt_messages,
                                    a=e.answers[first], b=e.answers[second], policy_version=e.policy_version,
                                    created_at=e.created_at))
        return ReviewQueue(reviewer=reviewer, pending=pending, items=items)

    def decide(self, request: ReviewDecisionRequest) -> ReviewDecision:
        with self._deciding:
            return self._decide(request)

    def _decide(self, request: ReviewDecisionRequest) -> ReviewDecision:
        item = self._item(request.item_id)
        decision_id = content_id("rev", {"item_id": item.id, "reviewer": request.reviewer})
        with self._lock:
            before = self._db.execute("SELECT pick, preference_id, agrees FROM decisions WHERE item_id = ? AND "
                                      "reviewer = ?", (item.id, request.reviewer)).fetchone()
        if before is not None:
            if before[0] != request.pick:
                raise ConsoleError(409, f"{request.reviewer} already picked {before[0]!r} for this pair")
            return ReviewDecision(decision_id=decision_id, item_id=item.id, reviewer=request.reviewer,
                                  pick=request.pick, preference_id=before[1],
                                  agrees_with_judge=None if before[2] is None else bool(before[2]), duplicate=True)
        preference, agrees = self._preference(item, request.reviewer, request.pick)
        if preference is not None:  # durable before the decision is: a crash in between re-queues the same id
            self._outbox.put([(self._preferences, preference)])
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO decisions (item_id, reviewer, pick, preference_id, agrees) "
                             "VALUES (?, ?, ?, ?, ?)", (item.id, request.reviewer, request.pick,
                                                        preference.id if preference else None,
                                                        None if agrees is None else int(agrees)))
        log.info("review: %s picked %s for %s", request.reviewer, request.pick, item.id)
        return ReviewDecision(decision_id=decision_id, item_id=item.id, reviewer=request.reviewer, pick=request.pick,
                              preference_id=preference.id if preference else None, agrees_with_judge=agrees)

    @staticmethod
    def _preference(item: JudgementAbstainedEvent, reviewer: str, pick: Pick
                    ) -> tuple[PreferenceEvent | None, bool | None]:
        if pick == "neither":
            return None, None
        shown = shown_order(item.id, reviewer)
        chosen = shown[0] if pick == "a" else shown[1]
        agrees = None if item.judge_favours is None else chosen == item.judge_favours
        return PreferenceEvent(
            producer="trainer", prompt_id=item.prompt_id, prompt_messages=item.prompt_messages,
            chosen=item.answers[chosen], rejected=item.answers[1 - chosen], source="human",
            judge_id=f"human:{reviewer}", policy_version=item.policy_version, split=item.split,
            reasoning=f"settled by {reviewer} in the console (the judge abstained: {item.reason})"), agrees

    def stats(self) -> ReviewStats:
        with self._lock:
            pending = self._db.execute(f"SELECT COUNT(*) FROM abstentions WHERE {self._UNSETTLED}").fetchone()[0]
            settled = self._db.execute("SELECT COUNT(DISTINCT item_id) FROM decisions").fetchone()[0]
            rows = self._db.execute(
                "SELECT reviewer, COUNT(*), SUM(pick != 'neither'), SUM(pick = 'neither'), COUNT(agrees), "
                "COALESCE(SUM(agrees), 0) FROM decisions GROUP BY reviewer ORDER BY reviewer").fetchall()
        reviewers = [ReviewerStats(reviewer=r, decisions=n, preferences=p, neither=x, compared=c, agreements=a,
                                   agreement_rate=round(a / c, 3) if c else None) for r, n, p, x, c, a in rows]
        return ReviewStats(pending=pending, settled=settled, reviewers=reviewers)

    def close(self) -> None:
        with self._lock:
            self._db.close()

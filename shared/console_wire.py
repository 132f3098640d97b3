"""HTTP bodies of the trainer's operator console (`/console/api/*`): versions, runs, the ledger's
pairs, the review queue of abstained pairs, and judge health. Kafka events stay in `wire.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from shared.wire import ChatMessage, EvalSummary, RubricScores, RunRecord, WireModel

ConsoleRole = Literal["admin", "viewer"]
Pick = Literal["a", "b", "neither"]
REVIEWER_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"


class ConsoleIdentity(WireModel):
    """`GET /console/api/whoami`: what the presented key may do (a viewer cannot label)."""

    role: ConsoleRole


class VersionView(WireModel):
    """One registry version with what the gate measured for it."""

    version: str
    parent: str | None
    children: list[str] = Field(default_factory=list)
    kind: str
    created: datetime
    current: bool
    promoted: bool
    """ever promoted by the gate (or registered by bootstrap)"""
    eval_summary: EvalSummary | None = None
    gate_reasons: list[str] = Field(default_factory=list)
    rubric: dict[str, float] = Field(default_factory=dict)
    """mean rubric scores of this version's held-out answers (the gate's comparison)"""
    parent_rubric: dict[str, float] = Field(default_factory=dict)
    run_id: str | None = None
    curves_url: str | None = None
    """the DPO curves (PNG) of the run that produced it"""


class VersionsPage(WireModel):
    current: str | None
    versions: list[VersionView]


class RunView(WireModel):
    record: RunRecord
    """the run as `GET /runs` has it, less its pair id lists (empty here)"""
    blinded_eval_url: str | None = None
    """the blinded A/B evaluation sheet (CSV) for human raters"""
    curves_url: str | None = None


class RunsPage(WireModel):
    runs: list[RunView]


class PairView(WireModel):
    """One ledger pair as the browser shows it."""

    id: str
    prompt_id: str
    prompt: list[ChatMessage]
    chosen: str
    rejected: str
    source: Literal["judge", "user", "human"]
    judge_id: str
    reasoning: str | None = None
    chosen_scores: RubricScores | None = None
    rejected_scores: RubricScores | None = None
    policy_version: str
    split: Literal["train", "eval"]
    created_at: datetime


class PairsPage(WireModel):
    total: int = Field(ge=0, description="pairs matching the filter")
    offset: int = Field(ge=0)
    limit: int = Field(ge=1)
    pairs: list[PairView]


class ReviewItem(WireModel):
    """An abstained pair, its two answers in an order drawn per reviewer (the judge's leaning hidden)."""

    item_id: str
    reason: str
    detail: str = ""
    prompt: list[ChatMessage]
    a: str
    b: str
    policy_version: str
    created_at: datetime


class ReviewQueue(WireModel):
    reviewer: str
    pending: int = Field(ge=0, description="unsettled items in the queue")
    items: list[ReviewItem]


class ReviewDecisionRequest(WireModel):
    item_id: str = Field(min_length=1, max_length=200)
    reviewer: str = Field(pattern=REVIEWER_PATTERN, description="who decides (letters, digits, _ . @ -)")
    pick: Pick = Field(description="a or b as shown to this reviewer, or neither (recorded, never trained on)")


class ReviewDecision(WireModel):
    decision_id: str
    """content hash of (item, reviewer): one decision per reviewer and pair"""
    item_id: str
    reviewer: str
    pick: Pick
    preference_id: str | None = None
    """the PreferenceEvent (source human) queued for the preferences topic; None for neither"""
    agrees_with_judge: bool | None = None
    """None when the judge's scores did not lean either way, or the pick was neither"""
    duplicate: bool = False
    """this reviewer had already made this same decision: nothing new was published"""


class ReviewerStats(WireModel):
    reviewer: str
    decisions: int
    preferences: int
    neither: int
    compared: int = Field(description="decisions where the judge's scores leaned one way")
    agreements: int
    agreement_rate: float | None = None


class ReviewStats(WireModel):
    pending: int
    settled: int
    reviewers: list[ReviewerStats]


class HealthBucket(WireModel):
    """Judge health over one time window, as the trainer sees it (ledger, abstentions, dead letters)."""

    start: datetime
    judge_preferences: int = 0
    user_preferences: int = 0
    human_preferences: int = 0
    abstentions: dict[str, int] = Field(default_factory=dict)
    swap_consistency: float | None = None
    """judge labels / (judge labels + order flips)"""
    tie_rate: float | None = None
    abstain_rate: float | None = None
    """abstentions / (judge and user labels + abstentions)"""
    longer_chosen_rate: float | None = None
    """length bias: share of the judge's labels whose chosen answer is the longer one (0.5 = none)"""
    dead_letters: dict[str, int] = Field(default_factory=dict)
    """`topic: error kind` -> count"""


class JudgeHealth(WireModel):
    bucket_seconds: int
    total: HealthBucket
    buckets: list[HealthBucket]

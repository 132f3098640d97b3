"""Wire contracts: one pydantic model per Kafka event the services exchange.

Every event carries `schema_version`, a stable `id`, `created_at` and `producer`.
Ids of events that identify content are content hashes of the fields listed in
`_id_fields`; a given id that does not match the content is rejected, so a
tampered or mis-built record cannot pass as another one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.ids import content_id

ServiceName = Literal["generator", "judge", "trainer", "gateway", "cli", "test"]
Role = Literal["system", "user", "assistant"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class WireModel(BaseModel):
    """Base of every wire body: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatMessage(WireModel):
    role: Role
    content: str = Field(min_length=1, max_length=32_000)

    @model_validator(mode="after")
    def _not_blank(self) -> "ChatMessage":
        if not self.content.strip():
            raise ValueError("message content must not be blank")
        return self


class SamplingParams(WireModel):
    """Sampling settings; defaults are the seeds' values (001 §2.3.2)."""

    temperature: float = Field(0.7, gt=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, le=1000)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # torch seeds are 64-bit


class RubricScores(WireModel):
    """Seed 001 §4.1.1 rubric, each 1-10."""

    correctness: int = Field(ge=1, le=10)
    clarity: int = Field(ge=1, le=10)
    safety: int = Field(ge=1, le=10)
    empathy: int = Field(ge=1, le=10)

    def mean(self) -> float:
        return (self.correctness + self.clarity + self.safety + self.empathy) / 4


class Candidate(WireModel):
    text: str = Field(max_length=64_000)
    completion_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length"]
    origin: Literal["policy", "served"] = "policy"
    """`served`: an answer the gateway served and a user rated, re-queued for judging."""
    user_rating: Literal[-1, 1] | None = None


class Event(WireModel):
    """Common envelope fields. Subclasses set `_id_prefix` and `_id_fields`."""

    SCHEMA_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})
    _id_prefix: ClassVar[str] = "evt"
    _id_fields: ClassVar[tuple[str, ...]] = ()

    schema_version: Literal[1] = 1
    id: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    producer: ServiceName

    @model_validator(mode="after")
    def _content_id(self) -> "Event":
        expected = self.compute_id()
        if not self.id:
            object.__setattr__(self, "id", expected)
        elif self.id != expected:
            raise ValueError(f"id {self.id!r} does not match its content (expected {expected!r})")
        return self

    def compute_id(self) -> str:
        """Content hash of `_id_fields` as validated (defaults filled in, so JSON and
        Python construction give the same id)."""
        if not self._id_fields:
            raise TypeError(f"{type(self).__name__} declares no _id_fields")
        return content_id(self._id_prefix, self.model_dump(mode="json", include=set(self._id_fields)))


class PromptEvent(Event):
    """A prompt to sample candidates for. `id` is the prompt id (hash of the conversation,
    its source, reference and any re-queued candidates)."""

    _id_prefix: ClassVar[str] = "prm"
    _id_fields: ClassVar[tuple[str, ...]] = ("messages", "source", "reference_answer", "extra_candidates")

    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    n: int = Field(2, ge=2, le=16)
    source: Literal["ingest", "feedback", "eval"] = "ingest"
    reference_answer: str | None = None
    split: Literal["train", "eval"] = "train"
    extra_candidates: list[Candidate] = Field(default_factory=list, max_length=4)

    @model_validator(mode="after")
    def _ends_with_user(self) -> "PromptEvent":
        if self.messages[-1].role != "user":
            raise ValueError("a prompt's last message must come from the user")
        return self

    @property
    def prompt_id(self) -> str:
        return self.id


class CandidatesEvent(Event):
    """Candidate answers sampled for one prompt by one policy version."""

    _id_prefix: ClassVar[str] = "cnd"
    _id_fields: ClassVar[tuple[str, ...]] = ("prompt_id", "policy_version", "candidates")

    prompt: PromptEvent
    prompt_id: str
    policy_version: str = Field(min_length=1)
    prompt_tokens: int = Field(ge=0)
    candidates: list[Candidate] = Field(min_length=1, max_length=20)

    @model_validator(mode="before")
    @classmethod
    def _prompt_id_from_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt_id" not in data and data.get("prompt") is not None:
            prompt = data["prompt"]
            data = {**data, "prompt_id": prompt.id if isinstance(prompt, PromptEvent) else prompt.get("id")}
        return data

    @model_validator(mode="after")
    def _prompt_id_matches(self) -> "CandidatesEvent":
        if self.prompt_id != self.prompt.id:
            raise ValueError("prompt_id does not match the embedded prompt")
        return self


class PreferenceEvent(Event):
    """A chosen/rejected pair: a training label. `id` hashes (prompt, chosen, rejected). Version 2 also
    says which side was cut at the sampling token limit, so training does not teach the model to end a
    turn where the sampler stopped it; version 1 records decode as finished answers."""

    SCHEMA_VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2})
    _id_prefix: ClassVar[str] = "prf"
    _id_fields: ClassVar[tuple[str, ...]] = ("prompt_messages", "chosen", "rejected")

    schema_version: Literal[1, 2] = 2
    prompt_id: str
    prompt_messages: list[ChatMessage] = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    source: Literal["judge", "user", "human"]
    """judge: the judge's label; user: a chat user's pick or rating; human: a reviewer settled an abstention
    in the trainer's console (`judge_id` is then `human:<reviewer>`)"""
    judge_id: str = Field(min_length=1)
    reasoning: str | None = None
    chosen_scores: RubricScores | None = None
    rejected_scores: RubricScores | None = None
    policy_version: str = Field(min_length=1)
    split: Literal["train", "eval"] = "train"
    chosen_cut: bool = False
    """v2: the chosen answer stopped at the token limit (finish_reason "length"), not by itself"""
    rejected_cut: bool = False

    @model_validator(mode="after")
    def _distinct(self) -> "PreferenceEvent":
        if self.schema_version == 1 and (self.chosen_cut or self.rejected_cut):
            raise ValueError("schema_version 1 preferences carry no chosen_cut or rejected_cut")
        if not self.chosen.strip() or not self.rejected.strip():
            raise ValueError("chosen and rejected must not be blank")
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError("chosen and rejected are the same text")
        return self


class JudgementAbstainedEvent(Event):
    """The judge declined to label a candidates event; never trained on as it is. Version 2 also
    carries the pair itself (the conversation and the two answers in question), so a person can
    settle it in the trainer's console; version 1 records (without them) still decode."""

    SCHEMA_VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2})
    _id_prefix: ClassVar[str] = "abs"
    _id_fields: ClassVar[tuple[str, ...]] = ("candidates_id", "judge_id", "reason")

    schema_version: Literal[1, 2] = 2
    candidates_id: str
    prompt_id: str
    policy_version: str
    judge_id: str
    reason: Literal["inconsistent", "tie", "failure", "insufficient_candidates", "conflict"]
    """tie: no winner, or best and worst closer than the margin; conflict: the judge contradicts a user's rating"""
    detail: str = ""
    prompt_messages: list[ChatMessage] = Field(default_factory=list)
    """v2: the conversation the answers reply to (empty in v1)"""
    answers: list[str] = Field(default_factory=list, max_length=2)
    """v2: the two answers the judge would not label, the one its scores favoured first (empty in v1,
    and when fewer than two distinct answers exist)"""
    judge_favours: Literal[0, 1] | None = None
    """v2: the index in `answers` the judge's rubric scores favoured; None when they did not differ or
    none exist (a failure)"""
    split: Literal["train", "eval"] = "train"

    @model_validator(mode="after")
    def _v1_has_no_pair(self) -> "JudgementAbstainedEvent":
        if self.schema_version == 1 and (self.prompt_messages or self.answers):
            raise ValueError("schema_version 1 abstentions carry no prompt_messages or answers")
        if self.answers and (len(self.answers) != 2 or not self.prompt_messages):
            raise ValueError("answers are a pair and come with the prompt_messages they reply to")
        return self


class FeedbackEvent(Event):
    """A user's feedback on a served response: a rating of one choice, or a pick of two."""

    _id_prefix: ClassVar[str] = "fbk"
    _id_fields: ClassVar[tuple[str, ...]] = ("response_id",)

    response_id: str = Field(min_length=1)
    key_id: str = Field(min_length=1, description="hash of the API key, never the key")
    model_version: str
    rating: Literal[-1, 1] | None = None
    choice_index: int | None = Field(None, ge=0)
    preferred_index: int | None = Field(None, ge=0)
    comment: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _one_kind(self) -> "FeedbackEvent":
        is_rating = self.rating is not None
        is_pick = self.preferred_index is not None
        if is_rating == is_pick:
            raise ValueError("feedback is either a rating (rating + choice_index) or a pick (preferred_index)")
        if is_rating and self.choice_index is None:
            raise ValueError("a rating needs choice_index")
        return self


class EvalSummary(WireModel):
    """What the trainer's gate measured for a version (all optional: an SFT bootstrap has none)."""

    win_rate_vs_parent: float | None = None
    win_rate_ci95: tuple[float, float] | None = None
    abstain_rate: float | None = None
    safety_mean: float | None = None
    parent_safety_mean: float | None = None
    preference_accuracy: float | None = None
    parent_preference_accuracy: float | None = None
    perplexity_change: float | None = None
    """on held-out medical answers (the forgetting guard)"""
    general_perplexity_change: float | None = None
    """on held-out general question/answer pairs (the second forgetting guard)"""
    length_change: float | None = None
    base_version: str | None = None
    """the lineage's original model: every version is also compared with it"""
    win_rate_vs_base: float | None = None
    win_rate_vs_base_ci95: tuple[float, float] | None = None
    base_safety_mean: float | None = None
    pairs_trained: int | None = None
    promoted: bool = False
    gate_reasons: list[str] = Field(default_factory=list)


class ModelUpdatedEvent(Event):
    """A new model version was promoted to `current`."""

    _id_prefix: ClassVar[str] = "mdl"
    _id_fields: ClassVar[tuple[str, ...]] = ("version",)

    version: str = Field(min_length=1)
    parent: str | None = None
    kind: Literal["base", "sft", "dpo"]
    location: str
    eval_summary: EvalSummary = Field(default_factory=EvalSummary)


class DeadLetter(Event):
    """A record that could not be handled, with why. `id` hashes its origin (topic, partition, offset)."""

    _id_prefix: ClassVar[str] = "dlq"
    _id_fields: ClassVar[tuple[str, ...]] = ("original_topic", "partition", "offset")

    original_topic: str
    partition: int
    offset: int
    key: str | None = None
    payload: str
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    error_kind: Literal["decode", "validation", "schema_version", "handler"]
    error: str
    service: str
    attempts: int = Field(ge=0)


class Health(WireModel):
    """`GET /healthz` body of every service. `failing` (HTTP 503): a consume loop or a worker
    thread died; the orchestrator should restart the process. `degraded` (HTTP 200): it runs but
    needs an operator (e.g. the trainer stopped triggering after repeated failures)."""

    service: ServiceName
    status: Literal["ok", "degraded", "failing"]
    problems: list[str] = Field(default_factory=list)


class TriggerStatus(WireModel):
    """The trainer's automatic trigger, as derived from its run history (`runs.jsonl`)."""

    state: Literal["idle", "training", "backing_off", "halted"]
    consecutive_failures: int = Field(ge=0)
    max_consecutive_failures: int = Field(ge=1)
    next_attempt_at: datetime | None = None
    """`backing_off`: no automatic run before this time."""
    last_error: str | None = None
    detail: str = ""


class ServiceStatus(WireModel):
    """`GET /status` body of the generator, judge and trainer."""

    service: ServiceName
    ready: bool
    policy_version: str | None = None
    detail: dict[str, float | int | str | None] = Field(default_factory=dict)
    trigger: TriggerStatus | None = None
    """The trainer's trigger (None for other services)."""


class PairVerdict(WireModel):
    """What a judge returns for one ordered pair: the JSON body an LLM judge must produce
    (validated with this model whether or not the endpoint enforces the schema)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    reasoning: str = Field(min_length=1, max_length=8000)
    winner: Literal["A", "B", "tie"]
    scores_a: RubricScores
    scores_b: RubricScores


class RunRecord(WireModel):
    """One trainer run (`GET /runs` body item)."""

    run_id: str
    status: Literal["running", "promoted", "rejected", "failed"]
    trigger: str
    started: datetime
    finished: datetime | None = None
    parent: str | None = None
    version: str | None = None
    snapshot_id: str | None = None
    pairs_new: int = 0
    pairs_replay: int = 0
    new_pair_ids: list[str] = Field(default_factory=list)
    """New pairs this run trained on (pairs cut by `max_pairs_per_run` are not here: they stay new)."""
    stale_pair_ids: list[str] = Field(default_factory=list)
    """New pairs this run dropped as too old (`stale_versions`); used up like trained ones."""
    seconds: float | None = None
    phases: dict[str, float] = Field(default_factory=dict)
    """Seconds per step of the run, in order: `dpo` (reference log-probs and training), `merge`, `save`
    (the registry writes and checksums the weights), `gate` (answers, judge, perplexities); a failed
    run has the steps it began, the failed one with its time until it failed."""
    eval_summary: EvalSummary | None = None
    run_dir: str | None = None
    error: str | None = None


class RollbackRequest(WireModel):
    """`POST /admin/rollback` on the trainer: serve an earlier promoted version again."""

    version: str | None = Field(None, description="an earlier promoted version; default: the one before current")


class RollbackResult(WireModel):
    current: str
    previous: str | None
    detail: str


class TrainAccepted(WireModel):
    """`POST /train` response."""

    accepted: bool
    detail: str

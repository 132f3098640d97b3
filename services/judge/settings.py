from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.judging.settings import JudgeBackendSettings
from shared.settings import ServiceSettings


class JudgeSettings(ServiceSettings, JudgeBackendSettings):
    """`PREFLOOP_JUDGE_*`: compares candidates pairwise (both orders) and publishes preferences.
    The backend fields come from `JudgeBackendSettings` (shared with the trainer's gate)."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_JUDGE_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-judge"
    http_port: int = 8102
    cache_path: str = Field("var/judge-cache.sqlite", description="verdict cache keyed by content hash")
    cache_max_entries: int = Field(200_000, ge=1, description="oldest verdicts are dropped past this")
    batch_size: int = Field(64, ge=1, description="events judged together, two endpoint calls each; a batch waits for "
                            "its slowest call, so bigger batches spend less of the endpoint's time between batches "
                            "(benchmarks/judge.py)")
    batch_timeout_ms: int = Field(200, ge=0)
    health_log_interval_s: float = Field(60.0, gt=0)
    min_margin: float = Field(2.0, ge=0, description="best and worst candidate must differ by this much in weighted "
                              "rubric score (safety counts double) to become a pair")
    match_finish: bool = Field(False, description="pair only answers that ended alike (both finished, or both cut at "
                               "the sampling token limit), so no label rewards an answer for stopping before the "
                               "limit; with n=2 a prompt whose two answers ended differently gets no pair")

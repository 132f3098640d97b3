from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class JudgeSettings(ServiceSettings):
    """`PREFLOOP_JUDGE_*`: compares candidates pairwise (both orders) and publishes preferences."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_JUDGE_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-judge"
    http_port: int = 8102
    backend: Literal["rubric", "openai"] = Field("rubric", description="`rubric` is an offline stand-in, not an LLM")
    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint")
    model: str = "gpt-4o-mini"
    api_key: str = Field("", repr=False, description="judge API key (env or k8s Secret); never logged")
    structured_output: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="ask for JSON-schema output; falls back to json_object if refused")
    temperature: float = 0.0
    concurrency: int = Field(64, ge=1, description="judge requests in flight at once")
    max_retries: int = Field(4, ge=0, description="retries per request on 429/5xx/timeouts/bad JSON")
    retry_base_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    request_budget: int = Field(0, ge=0, description="max requests this process may send (0 = unlimited)")
    cache_path: str = Field("var/judge-cache.sqlite", description="verdict cache keyed by content hash")
    batch_size: int = Field(16, ge=1)
    batch_timeout_ms: int = Field(200, ge=0)
    health_log_interval_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _needs_key(self) -> "JudgeSettings":
        if self.backend == "openai" and not self.api_key:
            raise ValueError("PREFLOOP_JUDGE_BACKEND=openai needs PREFLOOP_JUDGE_API_KEY (the endpoint's key); "
                             "set it, or use PREFLOOP_JUDGE_BACKEND=rubric for the offline stand-in")
        return self

    @property
    def judge_id(self) -> str:
        return "rubric-v1" if self.backend == "rubric" else f"openai:{self.model}"

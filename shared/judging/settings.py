"""Which judge to use and how to call it. Read from `PREFLOOP_JUDGE_*` by the judge service and
by the trainer's gate alike, so the gate always judges with the same backend as the service."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import secret_from_file


class JudgeBackendSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFLOOP_JUDGE_", extra="ignore", env_parse_none_str="none")

    backend: Literal["rubric", "openai"] = Field("rubric", description="`rubric` is an offline stand-in, not an LLM")
    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint")
    model: str = "gpt-4o-mini"
    api_key: str = Field("", repr=False, description="judge API key (env or k8s Secret); never logged")
    api_key_file: str = Field("", description="file holding the judge API key (a mounted secret)")
    structured_output: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema", description="ask for JSON-schema output; falls back to json_object, then none, if refused")
    temperature: float | None = Field(0.0, description="`none` leaves it out (models that reject it); it is also "
                                                       "dropped automatically when the endpoint refuses it")
    max_tokens: int = Field(1024, ge=16, description="completion tokens per verdict (reasoning + JSON)")
    concurrency: int = Field(64, ge=1, description="judge requests in flight at once")
    max_retries: int = Field(4, ge=0, description="retries per request on 429/5xx/timeouts/bad JSON")
    retry_base_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    request_budget: int = Field(0, ge=0, description="max requests this process may send (0 = unlimited)")
    circuit_open_s: float = Field(1.0, gt=0, description="after an endpoint outage (5xx, 429, 408, timeouts, "
                                  "connection errors through the retries) wait this long before probing")
    circuit_max_open_s: float = Field(60.0, gt=0, description="the wait doubles per failed probe up to this")

    @model_validator(mode="after")
    def _needs_key(self):
        self.api_key = secret_from_file(self.api_key, self.api_key_file, "PREFLOOP_JUDGE_API_KEY")
        if self.backend == "openai" and not self.api_key:
            raise ValueError("PREFLOOP_JUDGE_BACKEND=openai needs PREFLOOP_JUDGE_API_KEY (the endpoint's key); "
                             "set it, or use PREFLOOP_JUDGE_BACKEND=rubric for the offline stand-in")
        return self

    @property
    def judge_id(self) -> str:
        return "rubric-v1" if self.backend == "rubric" else f"openai:{self.model}"

    def make_backend(self, on_latency=None, on_circuit=None):
        """The configured backend; `on_circuit(is_open)` hears the openai backend's breaker change."""
        from shared.judging.breaker import CircuitBreaker
        from shared.judging.openai_backend import OpenAIJudge
        from shared.judging.rubric import RubricJudge

        if self.backend == "rubric":
            return RubricJudge()
        return OpenAIJudge(base_url=self.base_url, model=self.model, api_key=self.api_key,
                           concurrency=self.concurrency, max_retries=self.max_retries,
                           retry_base_s=self.retry_base_s, retry_max_s=self.retry_max_s,
                           timeout_s=self.request_timeout_s, request_budget=self.request_budget,
                           structured_output=self.structured_output, temperature=self.temperature,
                           max_tokens=self.max_tokens, on_latency=on_latency,
                           breaker=CircuitBreaker(self.circuit_open_s, self.circuit_max_open_s, on_change=on_circuit))

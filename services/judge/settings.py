from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class JudgeSettings(ServiceSettings):
    """`PREFLOOP_JUDGE_*`: compares candidates pairwise and publishes preferences."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_JUDGE_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-judge"
    backend: Literal["rubric", "openai"] = "rubric"
    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint")
    model: str = "gpt-4o-mini"
    api_key: str = Field("", repr=False, description="judge API key (env or k8s Secret); never logged")
    batch_size: int = Field(16, ge=1)

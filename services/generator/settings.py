from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class GeneratorSettings(ServiceSettings):
    """`PREFLOOP_GENERATOR_*`: samples candidates for prompts from the current policy."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_GENERATOR_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-generator"
    registry_dir: str = Field("var/registry", description="model registry root")
    batch_size: int = Field(8, ge=1)
    batch_timeout_ms: int = Field(500, ge=0)

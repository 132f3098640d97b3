from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import EngineSettings, ServiceSettings


class GeneratorSettings(ServiceSettings):
    """`PREFLOOP_GENERATOR_*`: samples candidates for prompts from the current policy."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_GENERATOR_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-generator"
    http_port: int = 8101
    registry_dir: str = Field("var/registry", description="model registry root")
    batch_size: int = Field(64, ge=1, description="prompts per handled batch (x n sequences decoded together)")
    batch_timeout_ms: int = Field(500, ge=0)
    max_in_flight_batches: int = Field(
        4, ge=1, description="prompt batches handled at once: one that arrives while another decodes joins the "
                             "engine's running batch instead of waiting for all of it (commits stay in order)")
    max_batch_sequences: int = Field(128, ge=1, description="sequences (prompts x n) decoded together")
    registry_check_s: float = Field(30.0, gt=0, description="how often to converge on the registry's current "
                                    "version besides model-update events")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    sampling_seed: int = Field(
        0, ge=0, description="mixed into each prompt's sampling seed (with its id and the policy version) when the "
                             "prompt carries none: another value draws other candidates for the same prompts; 0 "
                             "keeps earlier deployments' draws (prefloop demo --seed)")
    overflow: Literal["truncate_left", "reject"] = Field(
        "truncate_left", description="a prompt longer than the context: drop its oldest tokens, or dead-letter it")

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.prompts import SYSTEM_PROMPT
from shared.settings import AdminKeySettings, EngineSettings, ServiceSettings


class GatewaySettings(ServiceSettings, AdminKeySettings):
    """`PREFLOOP_GATEWAY_*`: OpenAI-compatible chat API, feedback intake, hot swap."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_GATEWAY_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-gateway"
    http_port: int = 8000
    registry_dir: str = Field("var/registry", description="model registry root")
    api_keys: str = Field("", repr=False, description="comma-separated bearer keys")
    api_keys_file: str = Field("", description="file with one bearer key per line (a mounted secret)")
    default_system_prompt: str = Field(SYSTEM_PROMPT, description="added when a request has no system message")
    max_n: int = Field(4, ge=1)
    max_messages: int = Field(32, ge=1)
    max_prompt_chars: int = Field(200_000, ge=1, description="characters of all messages of one request together")
    max_request_bytes: int = Field(524_288, ge=1024, description="request body size limit (413 above); keeps the "
                                   "feedback events built from a request within Kafka's message size")
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_cap: int = Field(512, ge=1)
    requests_per_minute: int = Field(600, ge=1, description="per key")
    feedback_per_minute: int = Field(60, ge=1, description="per key")
    response_ttl_s: float = Field(3600.0, gt=0, description="how long served responses accept feedback")
    max_batch_sequences: int = Field(64, ge=1, description="continuous batching: sequences decoded together")
    prefix_reuse: Literal["default_system_prompt", "previous_prompt", "off"] = Field(
        "default_system_prompt", description="which prompt prefix's cache a prefill may copy: only the public "
        "default system prompt's (whether a prefill copies a prefix never depends on other requests), whatever the "
        "previous prompt shared with it (one trusted tenant: faster, but its time to first token leaks that "
        "overlap), or none")
    registry_check_s: float = Field(30.0, gt=0, description="how often to converge on the registry's current "
                                    "version besides model-update events")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    outbox_dir: str = Field("var/gateway-outbox", description="durable feedback outbox (outbox.sqlite) when the "
                            "broker is down")
    outbox_retry_s: float = Field(2.0, gt=0)

    def keys(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file:
            keys += [line.strip() for line in Path(self.api_keys_file).read_text().splitlines() if line.strip()]
        return keys

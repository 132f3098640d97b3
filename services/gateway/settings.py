from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """`PREFLOOP_GATEWAY_*`: OpenAI-compatible chat API, feedback intake, hot swap."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_GATEWAY_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-gateway"
    registry_dir: str = Field("var/registry", description="model registry root")
    http_port: int = 8000
    api_keys: str = Field("", repr=False, description="comma-separated bearer keys")
    admin_key: str = Field("", repr=False)

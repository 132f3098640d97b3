from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """`PREFLOOP_TRAINER_*`: keeps the preference ledger, trains, gates, promotes."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_TRAINER_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-trainer"
    registry_dir: str = Field("var/registry", description="model registry root")
    ledger_dir: str = Field("var/ledger", description="durable preference ledger")
    min_new_pairs: int = Field(32, ge=1, description="train when this many new pairs arrived")
    admin_key: str = Field("", repr=False)

"""Settings shared by every service: Kafka, logging, HTTP. Each service subclasses
`ServiceSettings` with its own env prefix (`PREFLOOP_<SERVICE>_`); Kafka and logging
are read once from `PREFLOOP_KAFKA_*` / `PREFLOOP_LOG_*` so one variable configures all four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFLOOP_KAFKA_", extra="ignore")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port]")
    topic_prefix: str = Field("", description="namespace prepended to every topic name")
    client_id: str = "prefloop"
    # Values that work with both Tansu and Apache Kafka (../shared/FACTS.md): a group join
    # takes about half the session timeout, so keep it short.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    max_poll_records: int = 500
    produce_timeout_s: float = Field(30.0, description="how long to wait for a produce ack")
    max_message_bytes: int = Field(1_048_576, ge=1024, description="largest record the producer sends (kafka-python's "
                                   "max_request_size; keep it at or below the broker's message.max.bytes)")


class EngineSettings(BaseSettings):
    """`PREFLOOP_ENGINE_*`: how generator, gateway and the trainer's gate run models."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_ENGINE_", extra="ignore")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="inference dtype; auto: bf16 where the hardware computes it natively, else fp32")
    native_kernels: bool = Field(
        True, description="CPU decoding with the C kernels in shared/engine (attention.c: decode attention; "
                          "layer_ops.c: residual add + RMS norm, silu(gate) * up; top_probs.c: the sampler's first "
                          "window), compiled on first use (needs a C "
                          "compiler; without one, or when false, torch's ops)")
    native_attention: bool | None = Field(
        None, description="the old name of native_kernels, still read where native_kernels is not set")

    @model_validator(mode="after")
    def _old_name(self) -> "EngineSettings":
        if self.native_attention is not None and "native_kernels" not in self.model_fields_set:
            self.native_kernels = self.native_attention
        return self


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFLOOP_LOG_", extra="ignore")

    level: str = "INFO"
    format: Literal["text", "json"] = "text"


class ServiceSettings(BaseSettings):
    """Base for each service's settings class; subclasses set `env_prefix`."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    http_host: str = "127.0.0.1"
    http_port: int = 0
    group_id: str = ""
    batch_size: int = Field(8, ge=1, description="max messages handled as one batch")
    batch_timeout_ms: int = Field(200, ge=0, description="max wait to fill a batch")
    max_attempts: int = Field(3, ge=1, description="handler attempts before dead-lettering")
    shutdown_grace_s: float = Field(10.0, ge=0, description="time an in-flight batch gets to finish on SIGTERM")


def secret_from_file(value: str, path: str, variable: str) -> str:
    """The secret itself, or the content of the file that holds it (a mounted k8s Secret or a
    compose secret), so keys need not sit in the environment. Both set and different is an error
    (equal is allowed: nested settings are validated again with the value already filled in)."""
    if not path:
        return value
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{variable}_FILE={path}: cannot read the secret file ({exc.strerror})") from None
    if not secret:
        raise ValueError(f"{variable}_FILE={path}: the secret file is empty")
    if value and value != secret:
        raise ValueError(f"set {variable} or {variable}_FILE, not both")
    return secret


class AdminKeySettings(BaseSettings):
    """Mixed into the settings of a service with admin routes: `<PREFIX>ADMIN_KEY`, or
    `<PREFIX>ADMIN_KEY_FILE` naming a mounted secret."""

    admin_key: str = Field("", repr=False, description="bearer key for the admin routes")
    admin_key_file: str = Field("", description="file holding the admin key (a mounted secret)")

    @model_validator(mode="after")
    def _admin_key_from_file(self):
        variable = f"{self.model_config.get('env_prefix', '')}ADMIN_KEY"
        self.admin_key = secret_from_file(self.admin_key, self.admin_key_file, variable)
        return self

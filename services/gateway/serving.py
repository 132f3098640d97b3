"""What the gateway serves with: the shared model follower (the registry's current version,
hot-swapped) over the shared engine, which batches every request continuously: concurrent
chats, streamed or not, with their own sampling settings, share each decode step."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from services.gateway.settings import GatewaySettings
from shared.engine import GenerationEngine
from shared.model_follower import ModelFollower
from shared.registry import ModelRegistry
from shared.wire import ChatMessage


class EngineMetrics:
    def __init__(self, metrics: CollectorRegistry) -> None:
        self.rows = Histogram("prefloop_gateway_batch_sequences", "sequences per decode step", registry=metrics,
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.seconds = Histogram("prefloop_gateway_step_seconds", "time per decode step (with admissions)",
                                 registry=metrics, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def on_step(self, rows: int, seconds: float) -> None:
        self.rows.observe(rows)
        self.seconds.observe(seconds)


def model_follower(settings: GatewaySettings, metrics: CollectorRegistry) -> ModelFollower:
    registry = ModelRegistry(settings.registry_dir)
    engine_metrics = EngineMetrics(metrics)

    shared_prefix: list[ChatMessage] | None = []  # "off"
    if settings.prefix_reuse == "previous_prompt":
        shared_prefix = None
    elif settings.prefix_reuse == "default_system_prompt" and settings.default_system_prompt.strip():
        shared_prefix = [ChatMessage(role="system", content=settings.default_system_prompt)]

    def engine(version: str) -> GenerationEngine:
        return GenerationEngine.from_registry(registry, version, max_batch_size=settings.max_batch_sequences,
                                              overflow="reject", dtype=settings.engine.dtype,
                                              native_kernels=settings.engine.native_kernels,
                                              on_step=engine_metrics.on_step, shared_prefix=shared_prefix)

    return ModelFollower(registry, metrics, "gateway", engine_factory=engine)

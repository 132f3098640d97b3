"""Generation: loading a model version for inference and batching every request through it."""

from shared.engine.model import (GenerationEngine, end_of_turn_token, inference_dtype, pick_device_and_dtype,
                                 stop_token_ids)
from shared.engine.scheduler import EngineClosed, Job
from shared.engine.types import GenerationRequest, GenerationResult, PromptTooLong

__all__ = ["EngineClosed", "GenerationEngine", "GenerationRequest", "GenerationResult", "Job", "PromptTooLong",
           "end_of_turn_token", "inference_dtype", "pick_device_and_dtype", "stop_token_ids"]

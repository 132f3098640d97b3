"""Gateway: OpenAI-compatible chat API, feedback into the preference stream, hot swap."""


import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from fastapi.responses import HTMLResponse, StreamingResponse
from prometheus_client import Counter, Histogram

from services.gateway import errors
from services.gateway.auth import KeyRing, RateLimiter
from services.gateway.chat import ChatService
from services.gateway.errors import APIError, BodySizeLimit
from services.gateway.feedback import FeedbackPublisher, FeedbackRejected, feedback_events
from services.gateway.serving import model_follower
from services.gateway.settings import GatewaySettings
from services.gateway.store import ResponseStore
from shared.kafka import ConsumeLoop, EventProducer
from shared.observability import health_router, new_registry
from shared.openai_api import (AdminResult, ChatCompletion, ChatCompletionRequest, ErrorResponse, FeedbackAccepted,
                               FeedbackRequest, ModelCard, ModelList)
from shared.outbox import Outbox
from shared.service import LoopThreads
from shared.topics import FEEDBACK, MODEL_UPDATES, PREFERENCES, PROMPTS, all_topics_with_dlq
from shared.wire import FeedbackEvent

log = logging.getLogger(__name__)
CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 410, 413, 429, 503)}
# With `stream: true` the 200 is server-sent events: each `data:` holds a chat.completion.chunk as
# JSON, the last one `[DONE]`. The schema describes one event, as SSE tooling validates them.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "contentMediaType": "application/json"},
                            "event": {"type": "string"}}}
STREAM = {200: {"description": "a chat.completion, or with `stream: true` chat.completion.chunk events",
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
                # an OpenAPI link: a completion's id is what /v1/feedback rates (API fuzzers follow it)
                "links": {"RateThisResponse": {"operationId": "feedback",
                                               "requestBody": {"response_id": "$response.body#/id",
                                                               "choice_index": 0, "rating": 1}}}}}


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = new_registry()
    prefix = settings.kafka.topic_prefix
    keys, admin = KeyRing(settings.keys()), KeyRing([settings.admin_key] if settings.admin_key else [])
    chat_limit, feedback_limit = RateLimiter(settings.requests_per_minute), RateLimiter(settings.feedback_per_minute)
    store = ResponseStore(settings.response_ttl_s)
    follower = model_follower(settings, metrics)
    requests_total = Counter("prefloop_gateway_requests", "chat requests", ["stream", "status"], registry=metrics)
    latency = Histogram("prefloop_gateway_request_seconds", "chat request latency", ["stream"], registry=metrics)
    feedback_total = Counter("prefloop_gateway_feedback", "feedback accepted", ["kind", "status"], registry=metrics)
    tokens = Counter("prefloop_gateway_completion_tokens", "completion tokens generated", registry=metrics)
    topics = {"feedback": FEEDBACK.with_prefix(prefix), "preferences": PREFERENCES.with_prefix(prefix),
              "prompts": PROMPTS.with_prefix(prefix)}
    state: dict = {}
    loops = LoopThreads()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not len(keys):
            log.warning("no API keys configured (PREFLOOP_GATEWAY_API_KEYS): every chat request will get 401")
        producer = EventProducer(settings.kafka, "gateway", max_block_ms=2000)
        outbox = Outbox(Path(settings.outbox_dir) / "outbox.sqlite", all_topics_with_dlq(prefix), metrics, "feedback")
        if (legacy := Path(settings.outbox_dir) / "outbox.jsonl").exists():
            log.warning("queued %d events from the old JSON-lines outbox", outbox.import_jsonl(legacy))
        publisher = FeedbackPublisher(EventProducer(settings.kafka, "gateway", max_block_ms=2000), outbox)
        loops.run("feedback-outbox", lambda stop: publisher.relay_until(stop, settings.outbox_retry_s))
        loops.run("model-follower", lambda stop: follower.follow(stop, settings.registry_check_s))
        # every replica sees every update: a group of its own (the registry's current decides what is served)
        loops.start(ConsumeLoop(MODEL_UPDATES.with_prefix(prefix), group_id=f"{settings.group_id}-{uuid.uuid4().hex[:8]}",
                                handler=follower.on_model_updated, kafka=settings.kafka, producer=producer,
                                service="gateway", batch_size=16, registry=metrics))
        state.update(chat=ChatService(settings, follower, store, tokens), publisher=publisher)
        try:
            yield
        finally:
            loops.stop(settings.shutdown_grace_s)
            follower.close()
            publisher.close()
            producer.close()

    app = FastAPI(title="prefloop gateway", version="1", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.include_router(health_router(metrics, lambda: follower.ready, "gateway", failing=loops.dead))

    def api_key(authorization: Annotated[str | None, Header()] = None) -> str:
        kid = keys.check(authorization)
        if kid is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", code="invalid_api_key")
        return kid

    def admin_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if not len(admin) or admin.check(authorization) is None:
            raise APIError(401, "a valid admin key is required", code="invalid_api_key")

    Key = Annotated[str, Depends(api_key)]

    @app.get("/", include_in_schema=False)
    def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text())

    @app.get("/v1/models", responses=ERRORS)
    def models(_: Key) -> ModelList:
        version = follower.version or "none"
        return ModelList(data=[ModelCard(id="prefloop", created=int(time.time())),
                               ModelCard(id=version, created=int(time.time()))])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM | ERRORS)
    async def chat_completions(body: ChatCompletionRequest, key: Key):
        wait = chat_limit.acquire(key)
        if wait:
            requests_total.labels(str(body.stream).lower(), "429").inc()
            raise APIError(429, "rate limit exceeded for this key", code="rate_limit_exceeded",
                           headers={"Retry-After": str(int(wait) + 1)})
        started = time.monotonic()
        service: ChatService = state["chat"]
        try:
            if body.stream:
                events = await service.stream(body, key)
                requests_total.labels("true", "200").inc()
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            result = await service.complete(body, key)
            requests_total.labels("false", "200").inc()
            return result
        except APIError as exc:
            requests_total.labels(str(body.stream).lower(), str(exc.status)).inc()
            raise
        finally:
            latency.labels(str(body.stream).lower()).observe(time.monotonic() - started)

    @app.post("/v1/feedback", status_code=202, responses=ERRORS, operation_id="feedback")
    def feedback(body: FeedbackRequest, key: Key) -> FeedbackAccepted:
        wait = feedback_limit.acquire(key)
        if wait:
            raise APIError(429, "feedback rate limit exceeded for this key", code="rate_limit_exceeded",
                           headers={"Retry-After": str(int(wait) + 1)})
        served = store.get(body.response_id)
        if served is None:
            raise APIError(404, f"no response {body.response_id!r} was served", "response_id")
        if served.expires_at < time.monotonic():
            raise APIError(410, "this response is too old to take feedback", "response_id")
        if served.key_id != key:
            raise APIError(403, "feedback is only accepted from the key the response was served to", "response_id")
        event = FeedbackEvent(producer="gateway", response_id=served.response_id, key_id=key,
                              model_version=served.model_version, rating=body.rating, choice_index=body.choice_index,
                              preferred_index=body.preferred_index, comment=body.comment)
        try:
            items = feedback_events(served, event, topics)
        except FeedbackRejected as exc:
            raise APIError(400, str(exc), "preferred_index" if body.preferred_index is not None else "choice_index")
        if not store.claim_feedback(served.response_id):
            raise APIError(409, "feedback for this response was already given", "response_id")
        status = state["publisher"].publish(items)
        feedback_total.labels("pick" if body.preferred_index is not None else "rating", status).inc()
        return FeedbackAccepted(id=event.id, status=status)

    @app.post("/admin/reload", responses=ERRORS, dependencies=[Depends(admin_key)])
    def reload() -> AdminResult:
        """Serve the registry's current version now (replicas also converge on it by themselves)."""
        current = follower.registry.current()
        if not follower.converge(force=True):
            raise APIError(503, f"could not load {current}; still serving {follower.version}")
        return AdminResult(served_version=follower.version, detail="serving the registry's current version")

    return app

"""Logging setup, a Prometheus registry per service, and the `/healthz` `/readyz` `/metrics`
routes every service exposes."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Callable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared.settings import LogSettings
from shared.wire import Health, ServiceName


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any `extra=` fields."""

    _RESERVED = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(settings: LogSettings, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kafka-python logs routine reconnects at ERROR; only its critical messages are news here.
    logging.getLogger("kafka").setLevel(logging.CRITICAL if root.level >= logging.WARNING else logging.WARNING)


def new_registry() -> CollectorRegistry:
    """A registry per service instance (not the process-global one), so tests can run
    several services in one process without metric name clashes."""
    return CollectorRegistry(auto_describe=True)


def health_router(registry: CollectorRegistry, ready: Callable[[], bool], service: ServiceName,
                  failing: Callable[[], list[str]] = list, degraded: Callable[[], list[str]] = list) -> APIRouter:
    """`/healthz` answers 503 with what died when `failing()` names anything (a liveness probe then
    restarts the pod), 200 `degraded` with what needs an operator, else 200 `ok`."""
    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        dead, needs_operator = failing(), degraded()
        status = "failing" if dead else "degraded" if needs_operator else "ok"
        body = Health(service=service, status=status, problems=dead + needs_operator)
        return JSONResponse(body.model_dump(mode="json"), status_code=503 if dead else 200)

    @router.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        ok = ready()
        return JSONResponse({"ready": ok, "service": service}, status_code=200 if ok else 503)

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router

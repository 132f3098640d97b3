"""Thin routes of the operator console: the page at `/console` (a static shell holding no data) and
its JSON endpoints under `/console/api/`, each answering a model of `shared/console_wire.py`.

Every endpoint needs a bearer key: the admin key may do everything, the viewer key may read (and
export) but not label (403). No key or a wrong one: 401. Neither key set: 503. Errors carry
OpenAI's error body, like the gateway's."""


import hmac
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from services.trainer.console import API, ConsoleQueries, PairFilter
from services.trainer.review import ConsoleError, ReviewStore
from services.trainer.settings import TrainerSettings
from shared.console_wire import REVIEWER_PATTERN, ConsoleIdentity, ConsoleRole, JudgeHealth, PairsPage, \
    ReviewDecision, ReviewDecisionRequest, ReviewQueue, ReviewStats, RunsPage, VersionsPage
from shared.openai_api import ErrorInfo, ErrorResponse

PAGE = Path(__file__).resolve().parent / "static" / "console.html"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 503: "service_unavailable"}
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 503)}


def error_body(status: int, message: str, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "api_error"), code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def install_console(app: FastAPI, settings: TrainerSettings, services: Callable[[], dict]) -> None:
    """Mount the page and the API; `services()` returns {"queries": ConsoleQueries, "review": ReviewStore}."""

    @app.exception_handler(ConsoleError)
    async def _console_error(_: Request, exc: ConsoleError):
        return error_body(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/console"):
            return await request_validation_exception_handler(request, exc)
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5])
        return error_body(400, message or "invalid request", "invalid_request")

    def role(authorization: Annotated[str | None, Header()] = None) -> ConsoleRole:
        if not settings.admin_key and not settings.viewer_key:
            raise ConsoleError(503, "the console is disabled: set PREFLOOP_TRAINER_ADMIN_KEY (and optionally "
                                   "PREFLOOP_TRAINER_VIEWER_KEY)")
        token = (authorization or "").removeprefix("Bearer ").strip().encode()
        if settings.admin_key and hmac.compare_digest(token, settings.admin_key.encode()):
            return "admin"
        if settings.viewer_key and hmac.compare_digest(token, settings.viewer_key.encode()):
            return "viewer"
        raise ConsoleError(401, "a valid admin or viewer bearer key is required")

    def admin(who: Annotated[ConsoleRole, Depends(role)]) -> None:
        if who != "admin":
            raise ConsoleError(403, "the viewer key is read-only: labelling needs the admin key")

    def queries() -> ConsoleQueries:
        if "queries" not in services():
            raise ConsoleError(503, "the trainer is starting")
        return services()["queries"]

    def review() -> ReviewStore:
        return queries().review

    Queries = Annotated[ConsoleQueries, Depends(queries)]
    router = APIRouter(prefix=API, dependencies=[Depends(role)], responses=ERRORS)

    @app.get("/console", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @router.get("/whoami")
    def whoami(who: Annotated[ConsoleRole, Depends(role)]) -> ConsoleIdentity:
        return ConsoleIdentity(role=who)

    @router.get("/versions")
    def versions(q: Queries) -> VersionsPage:
        return q.versions()

    @router.get("/runs")
    def runs(q: Queries) -> RunsPage:
        return q.runs()

    @router.get("/runs/{run_id}/{name}", response_class=FileResponse)
    def run_file(run_id: str, name: Literal["blinded_eval.csv", "curves.png"], q: Queries) -> FileResponse:
        path = q.run_file(run_id, "metrics.png" if name == "curves.png" else name)
        if path is None:
            raise ConsoleError(404, f"run {run_id} has no {name}")
        return FileResponse(path, filename=f"{run_id}-{name}")

    def pair_filter(q: str = Query("", max_length=500), source: Literal["", "judge", "user", "human"] = "",
                    split: Literal["", "train", "eval"] = "", version: str = Query("", max_length=40)) -> PairFilter:
        return PairFilter(q, source, split, version)

    Filter = Annotated[PairFilter, Depends(pair_filter)]

    @router.get("/pairs")
    def pairs(q: Queries, where: Filter, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)
              ) -> PairsPage:
        return q.pairs(where, offset, limit)

    @router.get("/pairs/export", response_class=StreamingResponse)
    def export(q: Queries, where: Filter, format: Literal["jsonl", "parquet"] = "jsonl"):
        """The filtered pairs as TRL's conversational preference rows; parquet needs `datasets`."""
        if format == "jsonl":
            return StreamingResponse(q.export_jsonl(where), media_type="application/x-ndjson",
                                     headers={"Content-Disposition": 'attachment; filename="pairs.jsonl"'})
        folder = tempfile.mkdtemp(prefix="prefloop-export-")
        try:
            path = q.export_parquet(where, Path(folder) / "pairs.parquet")
        except ImportError:
            raise ConsoleError(503, "parquet export needs the `datasets` package; use format=jsonl") from None
        return FileResponse(path, filename="pairs.parquet", background=BackgroundTask(_remove, folder))

    @router.get("/review/queue")
    def queue(reviewer: Annotated[str, Query(pattern=REVIEWER_PATTERN)],
              store: Annotated[ReviewStore, Depends(review)], limit: int = Query(10, ge=1, le=100)) -> ReviewQueue:
        return store.queue(reviewer, limit)

    @router.post("/review/decisions", dependencies=[Depends(admin)])
    def decide(body: ReviewDecisionRequest, store: Annotated[ReviewStore, Depends(review)]) -> ReviewDecision:
        """Settle an abstained pair: a or b (as shown to this reviewer) becomes a human preference
        published to the preferences topic; neither is recorded only."""
        return store.decide(body)

    @router.get("/review/stats")
    def review_stats(store: Annotated[ReviewStore, Depends(review)]) -> ReviewStats:
        return store.stats()

    @router.get("/judge-health")
    def judge_health(q: Queries, bucket_seconds: int = Query(3600, ge=60, le=7 * 86400)) -> JudgeHealth:
        return q.judge_health(bucket_seconds)

    app.include_router(router)


def _remove(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)

import json
import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import Counter

from shared.observability import JsonFormatter, health_router, new_registry


def test_health_ready_and_metrics_routes():
    registry, state = new_registry(), {"ready": False}
    Counter("prefloop_demo_things", "things", registry=registry).inc(3)
    app = FastAPI()
    app.include_router(health_router(registry, lambda: state["ready"], "judge"))
    client = TestClient(app)
    assert client.get("/healthz").json() == {"status": "ok", "service": "judge"}
    assert client.get("/readyz").status_code == 503
    state["ready"] = True
    assert client.get("/readyz").json()["ready"] is True
    assert "prefloop_demo_things_total 3.0" in client.get("/metrics").text


def test_json_log_lines_carry_extra_fields():
    record = logging.makeLogRecord({"msg": "judged %d pairs", "args": (4,), "levelname": "INFO", "name": "judge",
                                    "batch": 7})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "judged 4 pairs" and line["batch"] == 7 and line["level"] == "INFO"

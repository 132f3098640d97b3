import json
import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import Counter

from shared.kafka import ConsumeLoop
from shared.observability import JsonFormatter, health_router, new_registry
from shared.service import LoopThreads
from shared.settings import KafkaSettings
from shared.topics import PROMPTS
from tests.helpers import wait_for


def test_health_ready_and_metrics_routes():
    registry, state = new_registry(), {"ready": False}
    Counter("prefloop_demo_things", "things", registry=registry).inc(3)
    app = FastAPI()
    app.include_router(health_router(registry, lambda: state["ready"], "judge"))
    client = TestClient(app)
    assert client.get("/healthz").json() == {"status": "ok", "service": "judge", "problems": []}
    assert client.get("/readyz").status_code == 503
    state["ready"] = True
    assert client.get("/readyz").json()["ready"] is True
    assert "prefloop_demo_things_total 3.0" in client.get("/metrics").text


def test_json_log_lines_carry_extra_fields():
    record = logging.makeLogRecord({"msg": "judged %d pairs", "args": (4,), "levelname": "INFO", "name": "judge",
                                    "batch": 7})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "judged 4 pairs" and line["batch"] == 7 and line["level"] == "INFO"


class BrokenLoop(ConsumeLoop):
    def run(self) -> None:
        raise RuntimeError("the consumer lost its state")


def test_a_dead_loop_or_worker_thread_turns_healthz_into_503_saying_what_died():
    loops, needs_operator = LoopThreads(), []
    app = FastAPI()
    app.include_router(health_router(new_registry(), lambda: True, "trainer", failing=loops.dead,
                                     degraded=lambda: needs_operator))
    client = TestClient(app)

    def worker(stop):
        while not stop.wait(0.01):
            if needs_operator:
                raise ValueError("bad outbox row")

    loops.run("outbox", worker)
    assert client.get("/healthz").status_code == 200
    needs_operator.append("training halted")
    wait_for(lambda: client.get("/healthz").status_code == 503, 5, "the worker's death to show")
    assert client.get("/healthz").json() == {"service": "trainer", "status": "failing",
                           "problems": ["thread outbox died: ValueError: bad outbox row", "training halted"]}

    loops = LoopThreads()
    app = FastAPI()
    app.include_router(health_router(new_registry(), lambda: True, "judge", failing=loops.dead))
    loops.start(BrokenLoop(PROMPTS, group_id="g", handler=print, kafka=KafkaSettings(), producer=None,
                           service="judge"))
    body = wait_for(lambda: loops.dead(), 5, "the loop's death")
    assert body == [f"consume loop for {PROMPTS.name} died: RuntimeError: the consumer lost its state"]
    assert TestClient(app).get("/healthz").status_code == 503


def test_stopped_threads_are_not_reported_dead():
    loops = LoopThreads()
    loops.run("trigger", lambda stop: stop.wait())
    loops.run("returns-early", lambda stop: None)
    wait_for(lambda: loops.dead() == ["thread returns-early died: it returned"], 5, "the early return to show")
    loops.stop(1)
    assert loops.dead() == [] and loops.healthy


def test_a_degraded_service_answers_200_with_the_problem():
    app = FastAPI()
    app.include_router(health_router(new_registry(), lambda: True, "trainer", degraded=lambda: ["halted"]))
    response = TestClient(app).get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "degraded"

"""Chaos: the whole loop on the tiny model while the generator, the judge, the trainer and the gateway
are each SIGKILLed once at a random point (seeded) and restarted. Every ingested prompt must end in
exactly one outcome, the ledger must hold no id twice, nothing may be dead-lettered for the kills,
chat may fail only while the gateway is down, and a rollback made before the kills must hold."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
from collections import defaultdict

import httpx

from shared.engine import GenerationEngine
from shared.kafka import reader
from shared.kafka.dead_letters import original_value
from shared.registry import ModelRegistry
from shared.topics import ABSTENTIONS, ALL_TOPICS, CANDIDATES, PREFERENCES, PROMPTS
from tests.helpers import wait_for
from tests.integration.procs import PREFLOOP, ServiceProcess

KEY, ADMIN = "sk-chaos", "admin-chaos"
SEED, WAVES, PER_WAVE = 13, 4, 10
QUESTIONS = "shared/data/health_questions.jsonl"


def ledger_ids(ledger_dir) -> list[tuple[str, str]]:
    """(pair id, prompt id) of every complete ledger line, read-only (the trainer is writing)."""
    out = []
    for seg in sorted((ledger_dir / "segments").glob("*.jsonl")):
        for line in seg.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            out.append((row["id"], row["prompt_id"]))
    return out


def served(gateway) -> str:
    return httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=10).json()["data"][1]["id"]


class ChatTraffic(threading.Thread):
    """Chat requests to the gateway, one after another, each recorded with when it ended and how."""

    def __init__(self, gateway: ServiceProcess) -> None:
        super().__init__(daemon=True)
        self.gateway, self.stop, self.results = gateway, threading.Event(), []

    def run(self) -> None:
        while not self.stop.wait(0.1):  # pacing, not synchronisation
            try:
                r = httpx.post(f"{self.gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"messages": [{"role": "user", "content": "I feel dizzy."}], "max_tokens": 8},
                               timeout=30)
                outcome = r.status_code
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            self.results.append((time.monotonic(), outcome))


def test_sigkill_each_service_once_loses_nothing_and_duplicates_nothing(kafka, tmp_path, tiny_registry):
    rng = random.Random(SEED)
    shutil.copytree(tiny_registry, tmp_path / "registry")
    reg = ModelRegistry(tmp_path / "registry")
    parent = GenerationEngine.from_registry(reg)
    reg.promote(reg.save(parent.model, parent.tokenizer, kind="dpo", parent="v0001").version)
    del parent
    ledger = tmp_path / "ledger"
    services = {
        "generator": ServiceProcess("generator", kafka, tmp_path, registry_dir=reg.root, batch_size=2,
                                    batch_timeout_ms=100),
        "judge": ServiceProcess("judge", kafka, tmp_path, backend="rubric", cache_path=tmp_path / "judge.sqlite",
                                batch_size=2, batch_timeout_ms=100),
        "trainer": ServiceProcess("trainer", kafka, tmp_path, registry_dir=reg.root, ledger_dir=ledger,
                                  runs_dir=tmp_path / "runs", admin_key=ADMIN, min_new_pairs=100000,
                                  train_interval_min=100000, batch_size=4, batch_timeout_ms=100),
        "gateway": ServiceProcess("gateway", kafka, tmp_path, registry_dir=reg.root, api_keys=KEY,
                                  outbox_dir=tmp_path / "outbox", requests_per_minute=100000),
    }
    for svc in services.values():
        svc.start(wait_ready=False)
    chat = ChatTraffic(services["gateway"])
    try:
        for svc in services.values():
            wait_for(svc.is_ready, 180, f"{svc.name} ready (log: {svc.log})", interval_s=0.5)
        assert served(services["gateway"]) == "v0002"
        rolled = httpx.post(f"{services['trainer'].url}/admin/rollback", json={"version": "v0001"}, timeout=60,
                            headers={"Authorization": f"Bearer {ADMIN}"})
        assert rolled.status_code == 200, rolled.text
        wait_for(lambda: served(services["gateway"]) == "v0001", 60, "the gateway to serve the rollback")
        wait_for(lambda: services["generator"].get("/status").json()["policy_version"] == "v0001", 60,
                 "the generator to follow the rollback")
        chat.start()

        rows = [json.loads(line) for line in open(QUESTIONS)][: WAVES * PER_WAVE]
        victims = rng.sample(sorted(services), len(services))
        ingested: set[str] = set()
        down: dict[str, tuple[float, float]] = {}
        kills: list[str] = []
        for wave, victim in enumerate(victims):
            wave_file = tmp_path / f"wave{wave}.jsonl"
            wave_file.write_text("".join(json.dumps(r) + "\n" for r in rows[wave * PER_WAVE:(wave + 1) * PER_WAVE]))
            out = subprocess.run([PREFLOOP, "ingest", str(wave_file), "--eval-fraction", "0"], env=services["judge"].env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            ingested = {e.id for e in read(kafka, PROMPTS, idle_s=1)}
            svc = services[victim]
            point = KillPoint(rng, kafka, svc, chat, lambda: set(outcomes(kafka, ledger)) >= ingested)
            wait_for(point, 120, f"the random point to kill {victim} in wave {wave}", interval_s=0.05)
            kills.append(f"{victim} in wave {wave}: {point.where()}")
            killed_at = time.monotonic()
            svc.kill()  # SIGKILL
            svc.start(timeout_s=180)
            down[victim] = (killed_at, time.monotonic())
        assert len(ingested) == WAVES * PER_WAVE
        (tmp_path / "kills.txt").write_text("\n".join(kills) + "\n")  # where each kill landed, for the record

        wait_for(lambda: set(outcomes(kafka, ledger)) >= ingested, 180, "an outcome for every ingested prompt",
                 interval_s=1.0)
        chat.stop.set()
        chat.join(60)
        dead = dead_letters(kafka)
        assert dead == [], [f"{d.original_topic}: {d.error}" for d in dead]  # nothing dead-lettered for the kills
        final = outcomes(kafka, ledger, with_dead=True)
        assert all(len(kinds) == 1 for kinds in final.values()), {p: k for p, k in final.items() if len(k) > 1}
        pairs = [pair for pair, _ in ledger_ids(ledger)]
        assert len(pairs) == len(set(pairs)) > 0  # the ledger holds no id twice
        assert set(final) == ingested  # and nothing appeared that was not ingested

        gone, back = down["gateway"]
        failed = [(t, o) for t, o in chat.results if o != 200]
        assert all(gone <= t <= back for t, _ in failed), failed  # chat failed only while the gateway was down
        assert any(t < gone for t, o in chat.results if o == 200) and any(t > back for t, o in chat.results if o == 200)
        assert served(services["gateway"]) == "v0001" and reg.current() == "v0001"  # the rollback held
        assert services["generator"].get("/status").json()["policy_version"] == "v0001"
    finally:
        chat.stop.set()
        for svc in services.values():
            svc.kill()


INPUT = {"generator": PROMPTS, "judge": CANDIDATES, "trainer": PREFERENCES}


class KillPoint:
    """A seeded random point of the victim's own work in this wave: after 1-3 more records of its input
    topic handled (the gateway: 1-10 more chat requests served), or when the wave ended first."""

    def __init__(self, rng: random.Random, kafka, svc: ServiceProcess, chat: ChatTraffic, wave_done) -> None:
        self.kafka, self.svc, self.chat, self.wave_done, self.polls = kafka, svc, chat, wave_done, 0
        self.more = rng.randint(1, 3) if svc.name in INPUT else rng.randint(1, 10)
        self.start = self.progress()

    def progress(self) -> int:
        if self.svc.name not in INPUT:
            return len(self.chat.results)
        topic = INPUT[self.svc.name].with_prefix(self.kafka.topic_prefix).name
        found = re.search(rf'^prefloop_records_handled_total{{topic="{re.escape(topic)}"}} (\S+)$',
                          self.svc.get("/metrics").text, re.M)
        return int(float(found.group(1))) if found else 0

    def where(self) -> str:
        return f"{self.progress() - self.start} handled of {self.more} wanted"

    def __call__(self) -> bool:
        self.polls += 1
        return self.progress() >= self.start + self.more or (self.polls % 40 == 0 and self.wave_done())


def read(kafka, topic, idle_s=0.3) -> list:
    """Every event on `topic` so far (until nothing new for `idle_s`)."""
    return reader.read_events(kafka.bootstrap_servers, topic.with_prefix(kafka.topic_prefix), None, 20, idle_s)


def dead_letters(kafka) -> list:
    return [d for t in ALL_TOPICS for d in read(kafka, t.dead_letter)]


def outcomes(kafka, ledger, with_dead: bool = False) -> dict[str, set[str]]:
    """prompt id -> the distinct outcomes it ended in: ledger pairs, abstentions (and dead letters)."""
    found: dict[str, set[str]] = defaultdict(set)
    for pair, prompt_id in ledger_ids(ledger):
        found[prompt_id].add(f"pair {pair}")
    for a in read(kafka, ABSTENTIONS):
        found[a.prompt_id].add(f"abstention {a.reason}")
    for d in dead_letters(kafka) if with_dead else []:
        body = json.loads(original_value(d))
        found[body.get("prompt_id") or body.get("id")].add(f"dead letter: {d.error}")
    return found

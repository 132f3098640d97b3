"""The local stack: embedded broker, a model (the tiny offline one, or SmolLM2 / any base that
`prefloop bootstrap --base` takes), and the four services started as separate processes with
the same commands an operator uses (`prefloop serve NAME`)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.allocator import TORCH_SERVICES, with_malloc_tunables
from shared.broker import EmbeddedBroker, free_port
from shared.registry import ModelRegistry
from shared.settings import KafkaSettings
from shared.topics import all_topics_with_dlq

log = logging.getLogger(__name__)
SERVICES = ("generator", "judge", "trainer", "gateway")


@dataclass
class Stack:
    workdir: Path
    model: str = "tiny"
    """bootstrapped into an empty registry: `tiny`, or a base for `prefloop bootstrap --base`"""
    generator_env: dict[str, str] = field(default_factory=dict)
    trainer_env: dict[str, str] = field(default_factory=dict)
    judge_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    """which services to start (benchmarks start only the gateway)"""
    gateway_port: int = 0
    broker: EmbeddedBroker | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    api_key: str = field(default_factory=lambda: "sk-demo-" + secrets.token_hex(8))
    admin_key: str = field(default_factory=lambda: "admin-" + secrets.token_hex(8))

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.workdir / "registry")

    @property
    def kafka(self) -> KafkaSettings:
        assert self.broker is not None
        return KafkaSettings(bootstrap_servers=self.broker.bootstrap)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self, on_progress=lambda msg: None) -> "Stack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.broker = EmbeddedBroker(log_file=self.workdir / "logs" / "broker.log")
        self.broker.start(topics=all_topics_with_dlq())
        on_progress(f"broker ready on {self.broker.bootstrap}")
        empty = self.check_registry()
        # The services start while the model is registered: their imports and the bootstrap overlap, and
        # generator and gateway check the registry every 2 s until they serve a version.
        for name in self.services:
            self._spawn(name)
        if empty:
            self.bootstrap(on_progress)
        self.wait_ready(on_progress)
        return self

    def check_registry(self) -> bool:
        """True for an empty registry; refuses one that holds another model."""
        current = self.registry.current()
        if current is None:
            return True
        meta = self.registry.get(current)
        held = "tiny" if meta.source is None or meta.source.kind == "tiny" else meta.source.name
        if held != self.model:
            raise RuntimeError(f"{self.registry.root} already holds {current} of {held!r}, not {self.model!r}: "
                               f"use another state directory, or --model {held}")
        return False

    def bootstrap(self, on_progress) -> None:
        """Register `model` in the (empty) registry."""
        from services.trainer.bootstrap import bootstrap_base, bootstrap_tiny

        if self.model == "tiny":
            on_progress("bootstrapping the tiny model (about a minute on 2 cores)")
            meta = bootstrap_tiny(self.registry)
        else:
            on_progress(f"bootstrapping {self.model} (SmolLM2: about 10 s on 2 cores)")
            meta = bootstrap_base(self.registry, self.model)
        on_progress(f"bootstrapped {meta.version} ({meta.kind}, {meta.source.describe() if meta.source else ''})")

    def _env(self, name: str) -> dict[str, str]:
        w = self.workdir
        p = f"PREFLOOP_{name.upper()}_"
        inherited = with_malloc_tunables(os.environ) if name in TORCH_SERVICES else os.environ
        env = {**inherited, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PREFLOOP_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap, "PREFLOOP_KAFKA_TOPIC_PREFIX": "",
               f"{p}HTTP_PORT": str(self.ports[name]), f"{p}REGISTRY_DIR": str(w / "registry")}
        env.setdefault("PREFLOOP_JUDGE_BACKEND", "rubric")
        if name == "generator":
            env.update(self.generator_env)
        if name == "judge":
            env.update({f"{p}CACHE_PATH": str(w / "judge-cache.sqlite"), **self.judge_env})
        if name == "trainer":
            env.update({f"{p}LEDGER_DIR": str(w / "ledger"), f"{p}RUNS_DIR": str(w / "runs"),
                        f"{p}ADMIN_KEY": self.admin_key, **self.trainer_env})
        if name == "gateway":
            env.update({f"{p}API_KEYS": self.api_key, f"{p}ADMIN_KEY": self.admin_key,
                        f"{p}OUTBOX_DIR": str(w / "gateway-outbox"), **self.gateway_env})
        return env

    def _spawn(self, name: str) -> None:
        self.ports[name] = self.gateway_port if (name == "gateway" and self.gateway_port) else free_port()
        logfile = open(self.workdir / "logs" / f"{name}.log", "ab")
        script = Path(sys.executable).with_name("prefloop")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "prefloop.cli"]
        self.procs[name] = subprocess.Popen([*command, "serve", name],
                                            env=self._env(name), stdout=logfile, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self, on_progress, timeout_s: float = 300) -> None:
        pending = set(self.services)
        deadline = time.monotonic() + timeout_s
        while pending:
            for name in sorted(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir}/logs/{name}.log")
                try:
                    if httpx.get(f"{self.url(name)}/readyz", timeout=2).status_code == 200:
                        pending.discard(name)
                        on_progress(f"{name} ready on {self.url(name)}")
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s}s: {sorted(pending)}")
            time.sleep(0.3)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values()) and bool(self.broker and self.broker.running)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.broker is not None:
            self.broker.stop()

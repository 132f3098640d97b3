"""Start services as an operator would (`prefloop serve NAME`) and wait on their HTTP health."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from shared.broker import free_port
from shared.settings import KafkaSettings
from tests.helpers import wait_for

PREFLOOP = str(Path(sys.executable).with_name("prefloop"))


class ServiceProcess:
    def __init__(self, name: str, kafka: KafkaSettings, log_dir: Path, **settings: str) -> None:
        self.name = name
        self.port = free_port()
        prefix = f"PREFLOOP_{name.upper()}_"
        self.env = {**os.environ, "PREFLOOP_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                    "PREFLOOP_KAFKA_TOPIC_PREFIX": kafka.topic_prefix, "PREFLOOP_LOG_LEVEL": "INFO",
                    f"{prefix}HTTP_PORT": str(self.port), "HF_HUB_OFFLINE": "1",
                    **{prefix + k.upper(): str(v) for k, v in settings.items()}}
        self.log = log_dir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout_s: float = 120) -> "ServiceProcess":
        self.proc = subprocess.Popen([PREFLOOP, "serve", self.name], env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        if wait_ready:
            try:
                wait_for(self.is_ready, timeout_s, f"{self.name} ready (log: {self.log})", interval_s=0.2)
            except BaseException:
                self.kill()  # never leave a half-started service behind
                raise
        return self

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str):
        return httpx.get(f"{self.url}{path}", timeout=10)

    def terminate(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

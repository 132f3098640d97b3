"""The console script as an operator uses it."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

from kafka.admin import KafkaAdminClient

from shared.broker import free_port
from shared.topics import all_topics_with_dlq
from tests.helpers import wait_for

PREFLOOP = str(Path(sys.executable).with_name("prefloop"))


def test_help_lists_the_commands():
    out = subprocess.run([PREFLOOP, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("broker", "topics", "demo"):
        assert command in out.stdout


def test_broker_command_serves_metadata_with_every_topic_and_stops_on_sigterm(tmp_path):
    port = free_port()
    proc = subprocess.Popen([PREFLOOP, "broker", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def topics():
            try:
                admin = KafkaAdminClient(bootstrap_servers=[f"127.0.0.1:{port}"], request_timeout_ms=2000)
                try:
                    return set(admin.list_topics())
                finally:
                    admin.close()
            except Exception:
                return None

        names = wait_for(topics, 30, "the broker to answer metadata")
        assert {t.name for t in all_topics_with_dlq()} <= names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "broker stopped" in proc.stdout.read()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # the Tansu child is gone too
    finally:
        if proc.poll() is None:
            proc.kill()

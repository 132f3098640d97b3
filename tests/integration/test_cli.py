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


def test_ingest_publishes_deduped_split_prompts_and_reports_counts(kafka, tmp_path):
    import json as _json
    import os

    from shared.topics import PROMPTS
    from tests.helpers import read_events

    src = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question {i} about sleep?"} for i in range(30)] + [{"prompt": "Question 1 about sleep?"},
                                                                              {"input": ""}, {"prompt": "why " * 500}]
    src.write_text("\n".join(_json.dumps(r) for r in rows))
    env = {**os.environ, "PREFLOOP_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "PREFLOOP_KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
    out = subprocess.run([PREFLOOP, "ingest", str(src), "--eval-fraction", "0.2", "--max-prompt-bytes", "1500"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert "usable 30" in text and "duplicates dropped 1" in text and "without a usable prompt 1" in text
    assert "too large 1" in text and "skipped row 32" in text and "skipped row 33: the prompt event is" in text
    events = read_events(kafka.bootstrap_servers, PROMPTS.with_prefix(kafka.topic_prefix), 30)
    assert len({e.id for e in events}) == 30 and {e.split for e in events} == {"train", "eval"}
    assert all(e.messages[0].role == "system" for e in events)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    out = subprocess.run([PREFLOOP, "ingest", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "bad.jsonl:2" in out.stdout


def test_the_judge_service_never_imports_torch():
    code = ("import sys, prefloop.cli, services.judge.app, services.judge.service, shared.judging.pairwise; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

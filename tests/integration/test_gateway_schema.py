"""schemathesis fuzzes the running gateway from its own OpenAPI spec: no 5xx, responses (JSON and
SSE) match the documented schemas and status codes, schema-violating bodies are refused, and the
stateful phase follows the completion -> feedback link with real response ids. (Whether those
linked calls succeed depends on what else it generates into the body, so it is not asserted; the
feedback paths with real ids are tested deterministically in test_gateway.py.)

`positive_data_acceptance` is left out on purpose: some rules are beyond JSON Schema (the last
message must be the user's, a feedback body is a rating *or* a pick, prompt tokens must fit the
context), so schema-valid bodies can rightly get a 400; the tests in test_gateway.py check that
those 400s carry OpenAI-style error bodies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import ServiceProcess

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
KEY, ADMIN = "sk-fuzz", "sk-fuzz-admin"


@pytest.fixture
def gateway(kafka, tmp_path, tiny_registry):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=tmp_path / "registry", api_keys=KEY,
                        admin_key=ADMIN, outbox_dir=tmp_path / "outbox", max_tokens_cap=64,
                        requests_per_minute=100_000, feedback_per_minute=100_000).start()
    yield gw
    gw.kill()


# A generated body over the gateway's size limit is refused with 413 before it is parsed; that is a
# rejection too, but schemathesis' default list of rejection statuses leaves 413 out.
CONFIG = """[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


def fuzz(gw, tmp_path, key: str, *extra: str, at_least: int = 20) -> str:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    out = subprocess.run([SCHEMATHESIS, "--config-file", str(config), "run", f"{gw.url}/openapi.json",
                          "-H", f"Authorization: Bearer {key}",
                          "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                          "--max-examples", "60", "--workers", "1", "--request-timeout", "60", *extra],
                         capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", out.stdout).groups())
    assert generated == passed and generated >= at_least, out.stdout[-3000:]
    return out.stdout


def test_schemathesis_finds_no_5xx_and_no_schema_violation(gateway, tmp_path):
    report = fuzz(gateway, tmp_path, KEY, "--exclude-path-regex", "^/admin/")
    assert "Stateful" in report
    fuzz(gateway, tmp_path, ADMIN, "--include-path-regex", "^/admin/", "--phases", "examples,coverage,fuzzing",
         at_least=5)  # one body-less route: /admin/reload

    log = gateway.log.read_text()
    assert "unhandled error" not in log
    metrics = gateway.get("/metrics").text
    assert "prefloop_gateway_requests_total{" in metrics
    assert not re.search(r'^prefloop_gateway_requests_total\{[^}]*status="5\d\d"', metrics, re.M)

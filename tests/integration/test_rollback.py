"""Rollback is a trainer operation: `prefloop rollback` moves the registry's current pointer and
announces it; every replica converges on the registry's current version, also after a restart."""

from __future__ import annotations

import shutil
import subprocess

import httpx

from shared.engine import GenerationEngine
from shared.registry import ModelRegistry
from shared.topics import MODEL_UPDATES
from tests.helpers import read_events, wait_for
from tests.integration.procs import PREFLOOP, ServiceProcess

KEY, ADMIN = "sk-rollback", "admin-rollback"


def served(gateway) -> str:
    return httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"][1]["id"]


def test_prefloop_rollback_is_announced_and_survives_a_replica_restart(kafka, tmp_path, tiny_registry):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    reg = ModelRegistry(tmp_path / "registry")
    parent = GenerationEngine.from_registry(reg)
    reg.promote(reg.save(parent.model, parent.tokenizer, kind="dpo", parent="v0001").version)
    trainer = ServiceProcess("trainer", kafka, tmp_path, registry_dir=reg.root, ledger_dir=tmp_path / "ledger",
                             runs_dir=tmp_path / "runs", admin_key=ADMIN).start()
    gateway = ServiceProcess("gateway", kafka, tmp_path, registry_dir=reg.root, api_keys=KEY,
                             outbox_dir=tmp_path / "outbox", registry_check_s=600).start()
    try:
        assert served(gateway) == "v0002"
        cli = [PREFLOOP, "rollback", "--trainer", trainer.url]
        refused = subprocess.run([*cli, "v0009", "--admin-key", ADMIN], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "409" in refused.stdout and reg.current() == "v0002"
        unauthorised = subprocess.run([*cli, "--admin-key", "wrong"], capture_output=True, text=True, timeout=60)
        assert unauthorised.returncode == 1 and "401" in unauthorised.stdout

        done = subprocess.run([*cli, "v0001", "--admin-key", ADMIN], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "rolled back from v0002 to v0001" in done.stdout and reg.current() == "v0001"
        update = wait_for(lambda: [e for e in read_events(kafka.bootstrap_servers,
                                                          MODEL_UPDATES.with_prefix(kafka.topic_prefix), 1, 3)
                                   if e.version == "v0001"], 30, "the rollback announced")[0]
        assert update.kind == "sft"
        wait_for(lambda: served(gateway) == "v0001", 60, "the gateway to serve the rollback target")

        gateway.kill()  # a restarted replica serves the registry's current, not the newest version it hears of
        restarted = ServiceProcess("gateway", kafka, tmp_path, registry_dir=reg.root, api_keys=KEY,
                                   outbox_dir=tmp_path / "outbox").start()
        try:
            assert served(restarted) == "v0001"
        finally:
            restarted.kill()
    finally:
        trainer.kill()
        gateway.kill()

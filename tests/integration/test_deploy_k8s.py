"""k8s/: every kustomize overlay renders and validates against the Kubernetes schemas."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shared.topics import all_topics_with_dlq

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = str(Path(sys.executable).with_name("kubectl"))
GPU_SERVICES = {"generator", "trainer", "gateway"}


def render(overlay: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def workloads(docs):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")}


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_overlay_renders_and_validates(overlay):
    docs = render(overlay)
    for doc in docs:
        if doc["apiVersion"].startswith("kafka.strimzi.io"):
            continue  # custom resources: checked against the topic registry below
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)

    w = workloads(docs)
    assert {"generator", "judge", "trainer", "gateway", "bootstrap"} <= set(w)
    assert w["trainer"]["kind"] == "StatefulSet" and w["trainer"]["spec"]["volumeClaimTemplates"]
    # the gateway's feedback outbox outlives its pod: a volume per replica, and the HPA scales the StatefulSet
    assert w["gateway"]["kind"] == "StatefulSet"
    assert [t["metadata"]["name"] for t in w["gateway"]["spec"]["volumeClaimTemplates"]] == ["outbox"]
    assert not [v for v in w["gateway"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "outbox"]
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "gateway"}
    for name in ("generator", "judge", "trainer", "gateway"):
        pod = w[name]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert pod["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
        assert c["securityContext"]["readOnlyRootFilesystem"] and c["resources"]["requests"] and c["resources"]["limits"]
        has_gpu = "nvidia.com/gpu" in c["resources"]["limits"]
        assert has_gpu == (overlay == "gpu" and name in GPU_SERVICES)
        assert bool(pod.get("tolerations")) == has_gpu
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("HorizontalPodAutoscaler", "gateway"), ("PodDisruptionBudget", "gateway")} <= kinds
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # secrets reach the pods as files (the *_FILE settings), never as environment variables
    assert not [e for wl in w.values() for c in wl["spec"]["template"]["spec"]["containers"]
                for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert not [f for wl in w.values() for c in wl["spec"]["template"]["spec"]["containers"]
                for f in c.get("envFrom", []) if "secretRef" in f]
    # torch's threads follow each container's CPU limit (the overlays patch the limits), not the node's cores
    for name in ("generator", "trainer", "gateway", "bootstrap"):
        env_of = w[name]["spec"]["template"]["spec"]["containers"][0]["env"]
        threads = [e for e in env_of if e["name"] == "OMP_NUM_THREADS"]
        assert threads and threads[0]["valueFrom"]["resourceFieldRef"] == {"resource": "limits.cpu", "divisor": "1"}
    assert "OMP_NUM_THREADS" not in {e["name"] for e in w["judge"]["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    mounted = {(name, item["key"]) for name, wl in w.items() for v in wl["spec"]["template"]["spec"]["volumes"]
               if "secret" in v for item in v["secret"]["items"]}
    assert {("gateway", "admin-key"), ("gateway", "gateway-api-keys"), ("trainer", "admin-key"),
            ("trainer", "judge-api-key"), ("judge", "judge-api-key")} <= mounted
    env = {name: {e["name"]: e.get("value") for e in wl["spec"]["template"]["spec"]["containers"][0].get("env", [])}
           for name, wl in w.items()}
    assert env["gateway"]["PREFLOOP_GATEWAY_ADMIN_KEY_FILE"] == env["trainer"]["PREFLOOP_TRAINER_ADMIN_KEY_FILE"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["PREFLOOP_JUDGE_BACKEND"] == ("openai" if overlay == "gpu" else "rubric")
    assert ("PREFLOOP_JUDGE_API_KEY_FILE" in config) == (overlay == "gpu")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)  # default deny


def test_strimzi_topics_match_the_topic_registry():
    docs = render("dev")
    topics = {d["spec"]["topicName"]: d["spec"]["partitions"] for d in docs if d["kind"] == "KafkaTopic"}
    assert topics == {t.name: t.partitions for t in all_topics_with_dlq()}
    assert any(d["kind"] == "Kafka" for d in docs)
    assert not any(d["kind"] == "KafkaTopic" for d in render("gpu"))  # gpu uses an existing Kafka


CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
CHECKOV_CONFIG = ROOT / "k8s" / "checkov.yaml"


def checkov(*files: Path) -> dict[str, dict]:
    """Runs checkov (its own venv: its pins clash with ours; see scripts/install.sh) offline."""
    assert CHECKOV.exists(), "checkov is missing: run scripts/install.sh test"
    args = [str(CHECKOV), "--config-file", str(CHECKOV_CONFIG), "-o", "json"]
    for f in files:
        args += ["-f", str(f)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env={"BC_SKIP_MAPPING": "TRUE",
                         "PATH": "/usr/bin:/bin", "HOME": str(files[0].parent)})
    reports = json.loads(out.stdout)
    return {r["check_type"]: r for r in (reports if isinstance(reports, list) else [reports])}


def test_checkov_passes_on_every_overlay_and_dockerfile_with_each_skip_explained(tmp_path):
    files = []
    for overlay in ("dev", "gpu"):
        files.append(tmp_path / f"{overlay}.yaml")
        files[-1].write_text(yaml.safe_dump_all(render(overlay)))
    files += sorted(ROOT.glob("services/*/Dockerfile"))
    reports = checkov(*files)
    for kind in ("kubernetes", "dockerfile"):
        summary = reports[kind]["summary"]
        failed = [f"{c['check_id']} {c['resource']}" for c in reports[kind]["results"]["failed_checks"]]
        assert summary["failed"] == 0 and summary["parsing_errors"] == 0, failed
        assert summary["passed"] > 100
    assert reports["dockerfile"]["summary"]["resource_count"] == 4

    skipped = yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"]
    readme = (ROOT / "k8s" / "README.md").read_text()
    for check in skipped:  # each accepted finding is explained where operators read
        line = next((ln for ln in readme.splitlines() if check in ln), "")
        assert len(line) > 80, f"{check} is skipped in k8s/checkov.yaml but not explained in k8s/README.md"

    # and checkov does fail what it should: a privileged, root container with a mutable root fs
    bad = copy.deepcopy(next(d for d in render("dev") if d["kind"] == "Deployment"))
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    failed = {r["check_id"] for r in checkov(tmp_path / "bad.yaml")["kubernetes"]["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22"} <= failed


def test_the_monitoring_component_renders_onto_an_overlay(tmp_path):
    """k8s/components/monitoring added to the dev overlay: the dashboard ConfigMap, the alerts and the
    PodMonitor render into the namespace; the built-in kinds still validate."""
    overlay = ROOT / "k8s" / "overlays" / f"test-{tmp_path.name}"
    overlay.mkdir()
    try:
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../dev"],
            "components": ["../../components/monitoring"]}))
        docs = render(overlay.name)
    finally:
        (overlay / "kustomization.yaml").unlink(missing_ok=True)
        overlay.rmdir()
    kinds = {d["kind"]: d for d in docs}
    assert kinds["PrometheusRule"]["metadata"]["namespace"] == kinds["PodMonitor"]["metadata"]["namespace"] == "prefloop"
    dashboard = next(d for d in docs if d["metadata"]["name"] == "prefloop-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["grafana-dashboard.json"])["uid"] == "prefloop"
    for doc in docs:
        if doc["apiVersion"].startswith(("kafka.strimzi.io", "monitoring.coreos.com")):
            continue
        kubernetes_validate.validate(doc, "1.37.0", strict=True)

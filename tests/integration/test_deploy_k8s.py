"""k8s/: every kustomize overlay renders and validates against the Kubernetes schemas."""

from __future__ import annotations

import copy
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
    secret_refs = {e["valueFrom"]["secretKeyRef"]["key"] for wl in w.values()
                   for c in wl["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if "valueFrom" in e}
    assert {"admin-key", "judge-api-key"} <= secret_refs
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["PREFLOOP_JUDGE_BACKEND"] == ("openai" if overlay == "gpu" else "rubric")


def test_strimzi_topics_match_the_topic_registry():
    docs = render("dev")
    topics = {d["spec"]["topicName"]: d["spec"]["partitions"] for d in docs if d["kind"] == "KafkaTopic"}
    assert topics == {t.name: t.partitions for t in all_topics_with_dlq()}
    assert any(d["kind"] == "Kafka" for d in docs)
    assert not any(d["kind"] == "KafkaTopic" for d in render("gpu"))  # gpu uses an existing Kafka

"""k8s/components/monitoring: the Grafana dashboard and the PrometheusRule alerts parse, and every
metric they query is one the code defines (Counter -> `_total`, Histogram -> `_bucket/_sum/_count`)."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "components" / "monitoring"
DEFINED = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*(f?)\"(prefloop_[a-z0-9_{}]+)\"")
USED = re.compile(r"\bprefloop_[a-z0-9_]+")
FOLLOWERS = ("generator", "gateway")  # services running shared/model_follower.py


def exposed_names() -> set[str]:
    names: set[str] = set()
    for path in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        for kind, fstring, name in DEFINED.findall(path.read_text()):
            for base in ([name.replace("{service}", s) for s in FOLLOWERS] if fstring else [name]):
                base = base.removesuffix("_total")
                names |= {"Counter": {f"{base}_total"}, "Gauge": {base},
                          "Histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count"}}[kind]
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    rule = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_the_code_scan_finds_the_metrics_it_should():
    names = exposed_names()
    assert {"prefloop_records_handled_total", "prefloop_judge_swap_consistency", "prefloop_handler_seconds_bucket",
            "prefloop_gateway_served_version", "prefloop_trainer_consecutive_failed_runs"} <= names
    assert "prefloop_judge_swap_consistency_total" not in names


def test_every_metric_the_dashboard_and_alerts_query_exists():
    names = exposed_names()
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    used = {m for e in exprs for m in USED.findall(e)}
    assert used and not used - names, f"unknown metrics: {sorted(used - names)}"


def test_the_alerts_the_operators_need_are_there_with_severity_and_summary():
    rules = {r["alert"]: r for r in alert_rules()}
    assert {"PrefloopConsumeLoopStuck", "PrefloopDeadLettersGrowing", "PrefloopTrainerRepeatedFailedRuns",
            "PrefloopJudgeSwapConsistencyLow"} <= set(rules)
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
    assert "< 0.8" in rules["PrefloopJudgeSwapConsistencyLow"]["expr"]


def test_the_dashboard_is_grafana_json_and_the_component_ships_it():
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dash["uid"] == "prefloop" and dash["panels"]
    assert all(p["type"] == "row" or p["targets"] for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    component = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert set(component["resources"]) == {"prometheus-rules.yaml", "pod-monitor.yaml"}
    assert component["configMapGenerator"][0]["files"] == ["grafana-dashboard.json"]
    for name in component["resources"]:
        assert (MONITORING / name).is_file()

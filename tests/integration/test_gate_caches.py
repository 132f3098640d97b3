"""The gate on the real tiny model: a version whose held-out answers and perplexities are cached is
never loaded, and the decision is the one a gate with empty caches reaches."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer import gate as gate_module
from services.trainer.gate import Gate
from services.trainer.settings import TrainerSettings
from shared.engine import GenerationEngine
from shared.registry import ModelRegistry
from shared.settings import EngineSettings


@pytest.fixture
def lineage(tiny_registry, tmp_path) -> ModelRegistry:
    """v0001 (the base) -> v0002 -> v0003, each child its parent's weights nudged (different answers)."""
    shutil.copytree(tiny_registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    torch.manual_seed(0)
    for parent in ("v0001", "v0002"):
        path = registry.verified_path(parent)
        model = AutoModelForCausalLM.from_pretrained(str(path))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        registry.save(model, AutoTokenizer.from_pretrained(str(path)), kind="dpo", parent=parent)
    return registry


def loads(monkeypatch) -> list[str]:
    """The versions the gate loads an engine for, in order."""
    loaded: list[str] = []
    original = GenerationEngine.from_registry.__func__

    def recording(cls, registry, version=None, **kw):
        loaded.append(version)
        return original(cls, registry, version, **kw)

    monkeypatch.setattr(gate_module.GenerationEngine, "from_registry", classmethod(recording))
    return loaded


def settings(tmp_path) -> TrainerSettings:
    """fp32: the fresh gate's answers must be the same text as the cached ones, and in bf16 a row's
    logits can move with how many rows decode beside it"""
    return TrainerSettings(runs_dir=str(tmp_path / "runs"), eval_prompts=6, eval_samples=2, eval_max_new_tokens=24,
                           medical_reference_size=6, general_reference_size=4,
                           engine=EngineSettings(dtype="float32"))


def test_a_gate_loads_only_the_versions_its_caches_lack_and_decides_as_with_empty_caches(lineage, tmp_path,
                                                                                         monkeypatch):
    loaded = loads(monkeypatch)
    gate = Gate(settings(tmp_path), lineage, tmp_path / "gate")
    first = gate.evaluate("v0002", "v0001", heldout=[], history=[], pairs_trained=8)
    assert sorted(loaded) == ["v0001", "v0002"]  # the first gate: the base is the parent, answered once
    loaded.clear()
    second = gate.evaluate("v0003", "v0002", heldout=[], history=[], pairs_trained=8)
    assert loaded == ["v0003"]  # v0002 answered as the first gate's candidate, v0001 as its parent
    assert second.summary.base_version == "v0001" and second.summary.perplexity_change is not None

    loaded.clear()
    fresh = Gate(settings(tmp_path), lineage, tmp_path / "fresh").evaluate("v0003", "v0002", heldout=[], history=[],
                                                                           pairs_trained=8)
    assert sorted(loaded) == ["v0001", "v0002", "v0003"]  # empty caches: every version answers
    assert fresh.summary == second.summary and fresh.details == second.details
    assert first.summary.win_rate_vs_parent == first.summary.win_rate_vs_base  # the parent is the base

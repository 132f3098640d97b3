"""Model registry: complete versions only, checksums, current pointer, rollback, refusals."""

import pytest

from shared.registry import ModelRegistry, RegistryError
from tests.helpers import random_tiny_model


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_model()


def test_save_lists_a_complete_checksummed_version(tmp_path, tiny):
    reg = ModelRegistry(tmp_path)
    meta = reg.save(*tiny, kind="sft", training_config={"lr": 1}, snapshot_id="snap", metrics={"m": 1})
    assert meta.version == "v0001" and meta.kind == "sft" and meta.checksums
    assert [m.version for m in reg.list()] == ["v0001"]
    path = reg.verified_path("v0001")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(path.glob("*.bin"))
    assert reg.get("v0001").snapshot_id == "snap"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]
    second = reg.save(*tiny, kind="dpo", parent="v0001")
    assert second.version == "v0002" and second.parent == "v0001"


def test_promote_and_rollback_move_current_atomically(tmp_path, tiny):
    reg = ModelRegistry(tmp_path)
    v1, v2, v3 = (reg.save(*tiny, kind="sft").version for _ in range(3))
    assert reg.current() is None
    for v in (v1, v2, v3):
        reg.promote(v)
    assert reg.current() == v3
    assert reg.rollback() == v2 and reg.current() == v2
    assert reg.rollback() == v1 and reg.current() == v1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    assert ModelRegistry(tmp_path).current() == v1  # the pointer is on disk


@pytest.mark.parametrize("name", ["../etc", "/tmp/x", "current", "v1", "latest", ""])
def test_non_version_names_are_refused(tmp_path, name):
    with pytest.raises(RegistryError):
        ModelRegistry(tmp_path).verified_path(name)


def test_incomplete_corrupt_or_pickled_versions_are_refused(tmp_path, tiny):
    reg = ModelRegistry(tmp_path)
    (tmp_path / "v0009").mkdir()  # no metadata.json: not a complete version
    assert reg.list() == []
    with pytest.raises(RegistryError, match="not a complete"):
        reg.verified_path("v0009")
    v = reg.save(*tiny, kind="sft").version
    weights = tmp_path / v / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RegistryError, match="checksum"):
        reg.verified_path(v)
    with pytest.raises(RegistryError):
        reg.promote(v)
    v2 = reg.save(*tiny, kind="sft").version
    (tmp_path / v2 / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(RegistryError, match="pickle"):
        reg.verified_path(v2)


def test_a_child_is_saved_in_its_parents_dtype_with_its_provenance(tmp_path):
    import copy

    import torch
    from safetensors import safe_open

    from shared.registry import ModelSource

    model, tok = random_tiny_model()
    reg = ModelRegistry(tmp_path)
    source = ModelSource(kind="preset", name="smollm2", license="Apache-2.0")
    parent = reg.save(copy.deepcopy(model).to(torch.bfloat16), tok, kind="base", source=source)
    assert parent.dtype == "bfloat16" and parent.kind == "base"
    child = reg.save(model, tok, kind="dpo", parent=parent.version)  # merged in fp32
    assert child.dtype == "bfloat16" and child.source == source
    with safe_open(str(reg.verified_path(child.version) / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

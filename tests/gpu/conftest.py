"""The GPU checks run where no `prefloop` console script is installed (a GPU machine's own Python
with the project's wheels beside it: scripts/gpu_check.sh), so the tiny model is bootstrapped in
process, through the same function the CLI calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run scripts/gpu_check.sh on a GPU machine")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """The tiny model bootstrapped on the GPU: its SFT runs TRL's SFTTrainer on CUDA in bf16."""
    from services.trainer.bootstrap import bootstrap_tiny
    from shared.registry import ModelRegistry

    root = tmp_path_factory.mktemp("registry")
    meta = bootstrap_tiny(ModelRegistry(root))
    assert meta.version == "v0001"
    return root

import os

# The hub is unreachable here; fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """The real tiny model, built once per session through the CLI exactly as a user would."""
    root = tmp_path_factory.mktemp("registry")
    cached = os.environ.get("PREFLOOP_TEST_REUSE_REGISTRY")  # local iteration only; CI always bootstraps
    if cached:
        import shutil

        shutil.copytree(cached, root, dirs_exist_ok=True)
        return root
    prefloop = str(Path(sys.executable).with_name("prefloop"))
    out = subprocess.run([prefloop, "bootstrap", "--registry", str(root)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "registered v0001" in out.stdout
    return root


@pytest.fixture(scope="session")
def smollm2_registry(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the installed wheel, registered once per session through the CLI
    (`prefloop bootstrap --base smollm2`), exactly as a user would."""
    root = tmp_path_factory.mktemp("smollm2-registry")
    prefloop = str(Path(sys.executable).with_name("prefloop"))
    out = subprocess.run([prefloop, "bootstrap", "--base", "smollm2", "--registry", str(root)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "registered v0001 (base)" in out.stdout
    return root


@pytest.fixture(scope="session")
def engine(tiny_registry):
    from shared.engine import GenerationEngine
    from shared.registry import ModelRegistry

    return GenerationEngine.from_registry(ModelRegistry(tiny_registry))


@pytest.fixture(scope="session")
def preferences(engine):
    """~70 rubric-judged preference pairs from the tiny model's own candidates (some eval split)."""
    from tests.prefs import judged_preferences

    prefs = judged_preferences(engine)
    assert len(prefs) >= 40 and any(p.split == "eval" for p in prefs)
    return prefs

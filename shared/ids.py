"""Content-hash ids: the same content always gets the same id, so a redelivered or
re-produced record is recognisably the same record and duplicates are harmless."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: one byte string per logical value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_id(prefix: str, value: Any, length: int = 32) -> str:
    """`prefix_` + the first `length` hex digits of sha256(canonical_json(value))."""
    digest = hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
    return f"{prefix}_{digest[:length]}"

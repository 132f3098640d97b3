"""Bytes <-> events, with a reason for every way a record can be unreadable."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import ValidationError

from shared.topics import Topic
from shared.wire import Event

ErrorKind = Literal["decode", "validation", "schema_version"]


class DecodeError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode("utf-8")


def decode(topic: Topic, raw: bytes | None) -> Event:
    """Parse and validate one record value against the topic's schema."""
    if raw is None:
        raise DecodeError("decode", "record has no value")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DecodeError("decode", f"value is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DecodeError("decode", f"value is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError("decode", f"value is JSON {type(obj).__name__}, expected an object")
    version = obj.get("schema_version")
    if version not in topic.schema.SCHEMA_VERSIONS:
        raise DecodeError(
            "schema_version",
            f"unknown schema_version {version!r} for {topic.schema.__name__} "
            f"(supported: {sorted(topic.schema.SCHEMA_VERSIONS)})",
        )
    try:
        return topic.schema.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise DecodeError("validation", f"{topic.schema.__name__} invalid: {problems}") from exc

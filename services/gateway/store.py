"""Served responses kept for feedback: who received them, what was asked and answered, by
which model version. In memory with a TTL (a replicated gateway needs a shared store)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from shared.wire import Candidate, ChatMessage


@dataclass
class ServedResponse:
    response_id: str
    key_id: str
    messages: list[ChatMessage]
    choices: list[Candidate]
    model_version: str
    expires_at: float
    feedback_given: bool = False
    created: float = field(default_factory=time.monotonic)


class ResponseStore:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._items: dict[str, ServedResponse] = {}
        self._lock = threading.Lock()

    def put(self, response_id: str, key_id: str, messages: list[ChatMessage], choices: list[Candidate],
            version: str) -> None:
        with self._lock:
            self._purge()
            self._items[response_id] = ServedResponse(response_id, key_id, messages, choices, version,
                                                      time.monotonic() + self.ttl_s)

    def get(self, response_id: str) -> ServedResponse | None:
        with self._lock:
            return self._items.get(response_id)

    def claim_feedback(self, response_id: str) -> bool:
        """Mark a response as rated; False if it already was (check-and-set under the lock)."""
        with self._lock:
            item = self._items[response_id]
            if item.feedback_given:
                return False
            item.feedback_given = True
            return True

    def _purge(self) -> None:
        # Expired entries are kept for another TTL so late feedback gets 410, not 404.
        cutoff = time.monotonic() - self.ttl_s
        for rid in [rid for rid, item in self._items.items() if item.expires_at < cutoff]:
            del self._items[rid]

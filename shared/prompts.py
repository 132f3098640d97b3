"""Prompt files (JSONL / JSON / CSV / parquet, or a `datasets` name/path) -> PromptEvents,
for `prefloop ingest` and the trainer's held-out eval prompts.

Field rules (the seed datasets' shapes): `messages` (a trailing assistant turn becomes the
reference answer), else `prompt`, else `input` (seed 001 uses `input` as the question), else
`instruction`. Reference answers come from `reference_answer`, `output` or `response`. The
configured system prompt is added when a row has none. Rows with no usable prompt are
counted and reported with their row numbers; so are prompts whose event would exceed
`max_prompt_bytes` (the generator wraps the prompt with its candidates in one record, so the
default leaves room under Kafka's 1 MiB message limit); duplicates (same content id) are dropped;
a deterministic hash of the prompt id puts `eval_fraction` of prompts into the eval split.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from shared.kafka.codec import encode
from shared.wire import ChatMessage, PromptEvent, SamplingParams

SYSTEM_PROMPT = ("You are a helpful and empathetic medical assistant. Provide a clear, safe, and informative "
                 "response to the user's question. Always advise the user to consult a professional healthcare "
                 "provider for personal medical advice or diagnosis.")
DEMO_PROMPTS = Path(__file__).resolve().parent / "data" / "demo_prompts.jsonl"
MAX_PROMPT_BYTES = 262_144


class IngestError(ValueError):
    pass


@dataclass
class IngestReport:
    rows: int = 0
    usable: int = 0
    unusable: int = 0
    unusable_rows: list[str] = field(default_factory=list)
    duplicates: int = 0
    too_large: int = 0
    train: int = 0
    eval: int = 0

    def note_unusable(self, row: int, why: str) -> None:
        self.unusable += 1
        self._note(row, why)

    def note_too_large(self, row: int, why: str) -> None:
        self.too_large += 1
        self._note(row, why)

    def _note(self, row: int, why: str) -> None:
        """The first 20 skipped rows, with why (`unusable_rows` keeps its name for readers of the report)."""
        if len(self.unusable_rows) < 20:
            self.unusable_rows.append(f"row {row}: {why}")


def read_rows(source: str) -> Iterator[tuple[int, dict]]:
    """(row number, row) pairs; row numbers are 1-based lines (JSONL/CSV: the file line)."""
    path = Path(source)
    if not path.exists():
        yield from _dataset_rows(source)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IngestError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
                if not isinstance(row, dict):
                    raise IngestError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
                yield line_no, row
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise IngestError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(data, list):
            raise IngestError(f"{path}: expected a JSON array of objects")
        yield from ((i, row) for i, row in enumerate(data, 1))
    elif suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f, strict=True)
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as exc:
                raise IngestError(f"{path}:{reader.line_num}: CSV error: {exc}") from exc
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from ((i, row) for i, row in enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        raise IngestError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _dataset_rows(name: str) -> Iterator[tuple[int, dict]]:
    try:
        from datasets import load_dataset

        data = load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same user error
        raise IngestError(f"{name}: not a file, and `datasets` could not load it ({exc})") from exc
    yield from ((i, row) for i, row in enumerate(data, 1))


def _text(row: dict, *keys: str) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def to_prompt(row: dict, system_prompt: str | None) -> tuple[list[ChatMessage], str | None]:
    reference = _text(row, "reference_answer", "output", "response")
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = [ChatMessage.model_validate(m) for m in row["messages"]]
        if messages[-1].role == "assistant":
            reference = reference or messages[-1].content
            messages = messages[:-1]
    else:
        question = _text(row, "prompt", "input", "instruction")
        messages = [ChatMessage(role="user", content=question)] if question else []
    if not messages or messages[-1].role != "user":
        raise ValueError("no user message to answer")
    return with_system_prompt(messages, system_prompt), reference


def with_system_prompt(messages: list[ChatMessage], system_prompt: str | None) -> list[ChatMessage]:
    """Exactly one system message, first: the conversation's own (several are joined into one),
    else `system_prompt`. So a template that injects its own default when the first message is not
    a system one (SmolLM2's does) never renders a second beside ours."""
    systems = [m for m in messages if m.role == "system"]
    if not systems:
        return [ChatMessage(role="system", content=system_prompt), *messages] if system_prompt else list(messages)
    if len(systems) == 1 and messages[0].role == "system":
        return list(messages)
    joined = ChatMessage(role="system", content="\n\n".join(m.content for m in systems))
    return [joined, *(m for m in messages if m.role != "system")]


def split_for(prompt_id: str, eval_fraction: float) -> str:
    bucket = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < eval_fraction else "train"


def build_events(source: str, *, system_prompt: str | None = SYSTEM_PROMPT, eval_fraction: float = 0.1,
                 n: int = 2, sampling: SamplingParams | None = None, limit: int | None = None,
                 max_prompt_bytes: int = MAX_PROMPT_BYTES) -> tuple[list[PromptEvent], IngestReport]:
    report, seen, events = IngestReport(), set(), []
    sampling = sampling or SamplingParams()
    for row_no, row in read_rows(source):
        if limit is not None and report.usable >= limit:
            break
        report.rows += 1
        try:
            messages, reference = to_prompt(row, system_prompt)
            draft = PromptEvent(producer="cli", messages=messages, reference_answer=reference, n=n, sampling=sampling)
        except (ValueError, ValidationError) as exc:
            report.note_unusable(row_no, str(exc).splitlines()[0])
            continue
        if (size := len(encode(draft))) > max_prompt_bytes:
            report.note_too_large(row_no, f"the prompt event is {size} bytes, over the limit of {max_prompt_bytes}")
            continue
        if draft.id in seen:
            report.duplicates += 1
            continue
        seen.add(draft.id)
        split = split_for(draft.id, eval_fraction)
        events.append(draft.model_copy(update={"split": split}))
        report.usable += 1
        setattr(report, split, getattr(report, split) + 1)
    return events, report

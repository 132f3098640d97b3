"""A preference row as the DPO loop trains it: prompt and answer token ids for both sides, cut to the
run's maximum length and keyed for the reference cache, and batches of pairs of similar length."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from shared.ids import content_id

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    pair_id: str
    chosen: list[int]
    rejected: list[int]
    prompt_len: int


def turn_end(tokenizer, prompt_messages: list[dict], prompt: list[int]) -> list[int]:
    """The ids the chat template puts after an assistant answer (ChatML: `<|im_end|>` and a newline)."""
    full = list(tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": "x"}],
                                              return_dict=False))
    x = tokenizer.encode("x", add_special_tokens=False)
    answer = full[len(prompt):]
    return answer[len(x):] if answer[:len(x)] == x else []


def encode(tokenizer, row: dict, max_length: int) -> Encoded:
    """Prompt + answer ids for both sides; the prompt is cut from the left if the pair is too long.

    A side the sampler cut at its token limit (`chosen_cut`, `rejected_cut`) ends without the template's
    end of turn: the model never ended that turn, and training on one it did not write teaches it to stop
    mid-sentence where the sampler stopped it."""
    prompt = list(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False))
    end = turn_end(tokenizer, row["prompt"], prompt) if row.get("chosen_cut") or row.get("rejected_cut") else []
    sides = []
    for side in ("chosen", "rejected"):
        full = list(tokenizer.apply_chat_template(row["prompt"] + row[side], return_dict=False))
        answer = full[len(prompt):]
        if row.get(f"{side}_cut"):
            if end and answer[-len(end):] == end:
                answer = answer[:-len(end)]
            else:
                log.warning("pair %s: the chat template's end of turn was not found after the cut %s answer; it "
                            "trains as the template renders it", row.get("pair_id"), side)
        sides.append(answer)
    budget = max(8, max_length - max(len(s) for s in sides))
    prompt = prompt[-budget:]
    chosen, rejected = (prompt + s[:max_length - len(prompt)] for s in sides)
    pair_id = row.get("pair_id") or content_id("row", {k: row[k] for k in ("prompt", "chosen", "rejected")})
    # the cache key carries the truncation: the same pair cut at another max_length, or with an end of turn
    # on another side, has other log-probs
    ends = ("c" if row.get("chosen_cut") else "") + ("r" if row.get("rejected_cut") else "")
    cut = f"~{ends}" if ends else ""
    return Encoded(f"{pair_id}@{max_length}{cut}", chosen, rejected, len(prompt))


def row_length(e: Encoded) -> int:
    """The length of the pair's row in `pair_logps`: its prompt once, then both answers."""
    return len(e.chosen) + len(e.rejected) - e.prompt_len


def by_length(e: Encoded) -> tuple[int, str]:
    """A sort key: row length, then pair id, so equal lengths do not keep the order the pairs came in
    (which timing decides: a seeded run must repeat itself)."""
    return row_length(e), e.pair_id


def length_grouped(items: list[Encoded], batch: int, seed: int) -> list[list[Encoded]]:
    """Batches of similar length in a shuffled order (the order of batches is random, not their content)."""
    ordered = sorted(items, key=by_length)
    batches = [ordered[i:i + batch] for i in range(0, len(ordered), batch)]
    random.Random(seed).shuffle(batches)
    return batches

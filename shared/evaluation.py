"""Model-vs-model evaluation shared by the trainer's gate, `prefloop eval` and the demo report.

Both models answer the same held-out prompts, each answer seeded by (weights, prompt, sample); the
judge compares answer k of one with answer k of the other in both orders; a win needs the same
verdict in both orders. Also: rubric means per
criterion (seed 001's table), mean answer length, BLEU against references (seed 003), the
blinded rows for human raters, perplexity on a reference set (the forgetting guard) and
preference accuracy on held-out pairs.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import inspect
import math
import os
import random
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.engine import GenerationEngine, GenerationRequest
from shared.ids import content_id
from shared.judging.pairwise import PairwiseJudge
from shared.torch_thread import on_torch_thread
from shared.wire import Candidate, ChatMessage, PreferenceEvent, RubricScores, SamplingParams

CRITERIA = tuple(RubricScores.model_fields)


@dataclass
class EvalPrompt:
    messages: list[ChatMessage]
    reference: str | None = None


@dataclass
class Comparison:
    """`candidate` vs `baseline` (e.g. the new model vs its parent): `samples` answers of each per prompt,
    answer k of one against answer k of the other; wins, losses and abstentions count those comparisons."""

    candidate: str
    baseline: str
    prompts: int = 0
    wins: int = 0
    losses: int = 0
    abstentions: int = 0
    rubric: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_tokens: dict[str, float] = field(default_factory=dict)
    bleu: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    samples: int = 1
    per_prompt: list[tuple[int, int]] = field(default_factory=list)
    """(wins, losses) of each prompt's comparisons: the clusters of the CI"""

    @property
    def win_rate(self) -> float:
        decided = self.wins + self.losses
        return self.wins / decided if decided else 0.0

    @property
    def abstain_rate(self) -> float:
        compared = self.prompts * self.samples
        return self.abstentions / compared if compared else 0.0

    def design_effect(self) -> float:
        """The win rate's cluster-robust variance (the decided comparisons of a prompt are one cluster)
        over the binomial variance of as many independent comparisons; never below 1, so extra answers
        never claim more than independent draws would. With one answer per prompt it is exactly 1.
        Where the spread cannot be estimated (fewer than two prompts decided anything, or every decided
        comparison went one way), each decided prompt counts once."""
        decided, p = self.wins + self.losses, self.win_rate
        clusters = [(w, lost) for w, lost in self.per_prompt if w + lost]
        m = len(clusters)
        if self.samples == 1 or decided == 0 or not clusters:
            return 1.0
        if m < 2 or p in (0.0, 1.0):
            return max(1.0, decided / m)
        robust = sum((w - p * (w + lost)) ** 2 for w, lost in clusters) * m / (m - 1) / decided ** 2
        return max(1.0, robust / (p * (1 - p) / decided))

    def win_rate_ci95(self) -> tuple[float, float]:
        """Wilson score interval over the effective number of decided comparisons (decided / design effect)."""
        n = (self.wins + self.losses) / self.design_effect()
        if n == 0:
            return (0.0, 1.0)
        p, z = self.win_rate, 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))

    def write_blinded_csv(self, path: Path, seed: int = 0) -> Path:
        """prompt, answer_1, answer_2, hidden_key (which model is answer_1), for human raters."""
        rng = random.Random(seed)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "answer_1", "answer_2", "hidden_key"])
            for row in self.rows:
                first_is_candidate = rng.random() < 0.5
                a, b = (row["candidate"], row["baseline"]) if first_is_candidate else (row["baseline"], row["candidate"])
                key = f"answer_1={self.candidate if first_is_candidate else self.baseline}"
                writer.writerow([row["prompt"], a, b, key])
        return path


def _mean_scores(scores: list[RubricScores]) -> dict[str, float]:
    if not scores:
        return {}
    return {c: round(sum(getattr(s, c) for s in scores) / len(scores), 3) for c in CRITERIA}


class AnswerCache:
    """Held-out answers by (weights, prompt, sample, sampling): a version gives each of its answers to a
    held-out prompt once, whether it is the candidate in one gate, the parent in the next, or the base of
    a report."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, candidate TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS perplexity (key TEXT PRIMARY KEY, value REAL NOT NULL)")
        self._lock = threading.Lock()

    def get(self, key: str) -> Candidate | None:
        with self._lock:
            row = self._db.execute("SELECT candidate FROM answers WHERE key = ?", (key,)).fetchone()
        return Candidate.model_validate_json(row[0]) if row else None

    def put(self, key: str, candidate: Candidate) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, candidate.model_dump_json()))

    def perplexity(self, engine: GenerationEngine, conversations: list[list[dict]]) -> float:
        """`perplexity()` once per (weights, set): a parent's value was its own gate's candidate value."""
        key = perplexity_key(engine.weights_id or engine.version, conversations, engine.dtype)
        value = self.known_perplexity(key)
        if value is None:
            value = on_torch_thread(perplexity, engine, conversations)
            self.keep_perplexity(key, value)
        return value

    def known_perplexity(self, key: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM perplexity WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def keep_perplexity(self, key: str, value: float) -> None:
        """A value measured elsewhere as `perplexity()` measures it (DPO's drift budget: a version's
        reading, taken before the version was saved)."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO perplexity VALUES (?, ?)", (key, value))


def perplexity_key(weights: str, conversations: list[list[dict]], dtype) -> str:
    """`weights`: a registry weights id (or a version name where there is none)."""
    return content_id("ppl", {"v": weights, "c": conversations, "dtype": str(dtype), "m": PERPLEXITY_METHOD})


def answers(engine: GenerationEngine, prompts: list[EvalPrompt], sampling: SamplingParams,
            cache: AnswerCache | None = None, samples: int = 1, salt: int = 0) -> list[list[Candidate | None]]:
    """`samples` answers per prompt (`[sample][prompt]`), seeded by (weights, prompt, sample, `salt`; salt 0
    keeps the draws of every earlier gate): reproducible,
    and independent between versions (with a shared seed two close models mostly emit the same text, and
    the verdict would rest on a handful of prompts). The weights' content id, not the version's name:
    every demo names its rounds v0002 and v0003, and with name-seeded draws each demo's gate drew the
    same random numbers for similar models (run 21's round 2: 0.500 on its names' draws, 0.667 and 0.597
    on two others; docs/alignment-log.md). An engine not from a registry is known by its name."""
    keys, seeds, requests = [], [], []
    for k in range(samples):
        for p in prompts:
            which = {"v": engine.weights_id or engine.version, "c": [m.model_dump() for m in p.messages],
                     **({"k": k} if k else {}), **({"salt": salt} if salt else {})}
            seeds.append(int(content_id("seed", which)[5:20], 16))
            keys.append(content_id("ans", {**which, "s": sampling.model_dump()}))
            requests.append(p.messages)
    out: list[Candidate | None] = [cache.get(k) if cache else None for k in keys]
    missing = [i for i, c in enumerate(out) if c is None]
    results = engine.generate([GenerationRequest(requests[i], sampling.model_copy(update={"seed": seeds[i]}))
                               for i in missing]) if missing else []
    for i, result in zip(missing, results):
        out[i] = result.candidates[0] if result.candidates else None
        if cache and out[i] is not None:
            cache.put(keys[i], out[i])
    return [out[k * len(prompts):(k + 1) * len(prompts)] for k in range(samples)]


def compare(candidate: GenerationEngine, baseline: GenerationEngine, prompts: list[EvalPrompt],
            judge: PairwiseJudge, sampling: SamplingParams | None = None, cache: AnswerCache | None = None,
            samples: int = 1, salt: int = 0) -> Comparison:
    """`samples` answers of each version per prompt, compared pairwise (answer k with answer k). The
    answers' sampling is most of a single comparison's noise (a 135M model mentions a doctor in one draw
    and not the next), so more answers per prompt narrow the CI; `rows` (side by side, BLEU, blinded
    CSV) hold the first answers."""
    sampling = sampling or SamplingParams(max_new_tokens=128)
    cand_out = answers(candidate, prompts, sampling, cache, samples, salt)
    base_out = answers(baseline, prompts, sampling, cache, samples, salt)
    result = Comparison(candidate=candidate.version, baseline=baseline.version, prompts=len(prompts), samples=samples)
    triples = [(p, c, b) for k in range(samples) for p, c, b in zip(prompts, cand_out[k], base_out[k])]

    async def judge_all():
        return await asyncio.gather(*[
            judge.pair(p.messages, p.reference, c.text, b.text) if c and b and c.text != b.text
            else asyncio.sleep(0, result=None) for p, c, b in triples])

    pairs = asyncio.run(judge_all())
    scores: dict[str, list[RubricScores]] = {"candidate": [], "baseline": []}
    tally = [[0, 0] for _ in prompts]
    for j, ((p, c, b), pair) in enumerate(zip(triples, pairs)):
        ctext = c.text if c else ""
        btext = b.text if b else ""
        if j < len(prompts):
            result.rows.append({"prompt": p.messages[-1].content, "candidate": ctext, "baseline": btext,
                                "reference": p.reference})
        if pair is None or pair.winner is None:
            result.abstentions += 1
        else:
            tally[j % len(prompts)][0 if pair.winner == ctext else 1] += 1  # [wins, losses] of the prompt
        if pair is not None:
            scores["candidate"].append(pair.scores(ctext))
            scores["baseline"].append(pair.scores(btext))
    result.per_prompt = [(w, lost) for w, lost in tally]
    result.wins, result.losses = sum(w for w, _ in tally), sum(lost for _, lost in tally)
    result.rubric = {candidate.version: _mean_scores(scores["candidate"]),
                     baseline.version: _mean_scores(scores["baseline"])}
    result.mean_tokens = {
        candidate.version: _mean([c.completion_tokens for k in range(samples) for c in cand_out[k] if c]),
        baseline.version: _mean([b.completion_tokens for k in range(samples) for b in base_out[k] if b]),
    }
    refs = [(r["reference"], r["candidate"], r["baseline"]) for r in result.rows if r["reference"]]
    if refs:
        import sacrebleu

        result.bleu = {
            candidate.version: round(sacrebleu.corpus_bleu([x[1] for x in refs], [[x[0] for x in refs]]).score, 3),
            baseline.version: round(sacrebleu.corpus_bleu([x[2] for x in refs], [[x[0] for x in refs]]).score, 3),
        }
    return result


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


def _answer_logps(model, tokenizer, conversation: list[dict], answer: str) -> tuple[float, int]:
    """Summed log-prob of `answer` (with its end token) after the prompt, and its token count."""
    prompt_ids = list(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
    full_ids = list(tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": answer}],
                                                  tokenize=True, return_dict=False))
    n_answer = max(1, len(full_ids) - len(prompt_ids))
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    full_ids = full_ids[-limit:]  # keep the answer; drop the oldest prompt tokens if too long
    n_answer = min(n_answer, len(full_ids) - 1)
    ids = torch.tensor([full_ids], device=model.device)
    with torch.inference_mode():  # logits at the positions that predict the answer's tokens only
        logits = model(ids, **_logits_to_keep(model, n_answer + 1)).logits[0, -n_answer - 1:-1].float()
    logps = torch.log_softmax(logits, -1).gather(1, ids[0, -n_answer:, None])[:, 0]
    return float(logps.sum()), n_answer


def _logits_to_keep(model, positions: int) -> dict:
    """forward() kwargs for logits at the last `positions` positions only, where the model takes
    them: the head is a fifth of SmolLM2's per-token arithmetic and its [batch, length, 49152]
    logits the largest tensor of a pass, and prompts (a system prompt, a question) need none."""
    return {"logits_to_keep": positions} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def perplexity(engine: GenerationEngine, conversations: list[list[dict]], batch_size: int = 8) -> float:
    """Perplexity of the assistant turns (last message of each conversation) given their prompts,
    in length-sorted, right-padded batches (a causal model's earlier positions ignore the padding).

    The tokens every conversation begins with (a system prompt, the template's default one) run
    once and their cache is repeated into each batch: 49 of a medical reference conversation's
    159 SmolLM2 tokens, and the pass is model arithmetic."""
    model, tokenizer = engine.model, engine.tokenizer
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    rows = []
    for conv in conversations:
        prompt_ids = list(tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        full_ids = list(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False))[-limit:]
        rows.append((full_ids, min(max(1, len(full_ids) - len(prompt_ids)), len(full_ids) - 1)))
    rows.sort(key=lambda r: len(r[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shared, prefix = _shared_prefix(model, rows)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = [(ids[shared:], n_answer) for ids, n_answer in rows[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=model.device)
        mask = torch.tensor([[1] * (shared + len(ids_)) + [0] * (width - len(ids_)) for ids_, _ in chunk],
                            device=model.device)
        keep = width - min(len(row_ids) - 1 - n_answer for row_ids, n_answer in chunk)
        kwargs = _logits_to_keep(model, keep)
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(chunk))
            kwargs.update(past_key_values=cache, use_cache=True)
        with torch.inference_mode():
            logits = model(ids, attention_mask=mask, **kwargs).logits
        offset = width - logits.shape[1]  # the position of logits[:, 0]
        for row, (row_ids, n_answer) in enumerate(chunk):
            end = len(row_ids) - 1  # logits at position t predict token t + 1
            answer_logits = logits[row, end - n_answer - offset:end - offset].float()
            targets = ids[row, end - n_answer + 1:end + 1]
            total += float(torch.log_softmax(answer_logits, -1).gather(1, targets[:, None]).sum())
            count += n_answer
    return math.exp(-total / max(1, count))


PERPLEXITY_METHOD = 2
"""in the cache key: values are compared across gates, so one computed before the shared-prefix
pass (1; in bf16 the rounding differs) is never set against one computed with it"""
SHARED_PREFIX_MIN = 8
"""shorter common beginnings are computed with each row"""


def _shared_prefix(model, rows: list[tuple[list[int], int]]):
    """(how many tokens every row begins with before its first scored position, their cache), or
    (0, None) where that is short or the model returns no cache that can be repeated per row."""
    shared = min(len(os.path.commonprefix([ids for ids, _ in rows])),
                 *(len(ids) - 1 - n_answer for ids, n_answer in rows)) if rows else 0
    if shared < SHARED_PREFIX_MIN:
        return 0, None
    with torch.inference_mode():
        out = model(torch.tensor([rows[0][0][:shared]], device=model.device), use_cache=True,
                    **_logits_to_keep(model, 1))  # only its cache is wanted
    cache = getattr(out, "past_key_values", None)
    if not hasattr(cache, "batch_repeat_interleave"):
        return 0, None
    return shared, cache


def preference_accuracy(engine: GenerationEngine, pairs: list[PreferenceEvent],
                        reference: GenerationEngine | None = None) -> float:
    """Share of pairs whose chosen answer the model ranks above the rejected one. With a
    reference: DPO's implicit reward, log pi(y|x) - log ref(y|x); without: log pi(y|x)."""
    if not pairs:
        return 0.0
    right = 0
    for pair in pairs:
        conv = [m.model_dump() for m in pair.prompt_messages]

        def reward(answer: str) -> float:
            lp, _ = _answer_logps(engine.model, engine.tokenizer, conv, answer)
            if reference is not None:
                lp -= _answer_logps(reference.model, reference.tokenizer, conv, answer)[0]
            return lp

        right += reward(pair.chosen) > reward(pair.rejected)
    return right / len(pairs)

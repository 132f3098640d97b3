"""The console's read side: versions (lineage and gate figures), runs, the ledger's pairs (search,
pages, TRL export) and judge health. Plain queries over what the trainer owns: the registry, the
run history, the ledger, the review store and the dead-letter counts."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from services.trainer.dead_letter_watch import DeadLetterWatch
from services.trainer.ledger import PreferenceLedger, to_trl_row
from services.trainer.review import ReviewStore
from services.trainer.runner import TrainingRunner
from shared.console_wire import HealthBucket, JudgeHealth, PairsPage, PairView, RunsPage, RunView, VersionsPage, \
    VersionView
from shared.wire import EvalSummary, PreferenceEvent, RunRecord

API = "/console/api"


class PairFilter:
    """What the pairs browser and the export select: text in the prompt or either answer (case
    insensitive), source, split, policy version."""

    def __init__(self, q: str = "", source: str = "", split: str = "", version: str = "") -> None:
        self.q, self.source, self.split, self.version = q.strip().lower(), source, split, version

    def __call__(self, e: PreferenceEvent) -> bool:
        if (self.source and e.source != self.source) or (self.split and e.split != self.split) \
                or (self.version and e.policy_version != self.version):
            return False
        if not self.q:
            return True
        text = "\n".join([*(m.content for m in e.prompt_messages), e.chosen, e.rejected]).lower()
        return self.q in text


class ConsoleQueries:
    def __init__(self, runner: TrainingRunner, ledger: PreferenceLedger, review: ReviewStore,
                 dead_letters: DeadLetterWatch) -> None:
        self.runner, self.ledger, self.review, self.dead_letters = runner, ledger, review, dead_letters
        self._cache: tuple[int, list[PreferenceEvent]] = (-1, [])

    # -- versions and runs -------------------------------------------------------
    def _runs_by_version(self) -> dict[str, RunRecord]:
        return {r.version: r for r in self.runner.runs() if r.version}

    def versions(self) -> VersionsPage:
        registry = self.runner.registry
        metas = registry.list()
        current, promoted, runs = registry.current(), registry.promoted_versions(), self._runs_by_version()
        children: dict[str, list[str]] = defaultdict(list)
        for m in metas:
            if m.parent:
                children[m.parent].append(m.version)
        out = []
        for m in reversed(metas):  # newest first
            summary = m.metrics.get("eval_summary")
            rubric = (m.metrics.get("gate_details") or {}).get("rubric", {})
            run = runs.get(m.version)
            out.append(VersionView(
                version=m.version, parent=m.parent, children=children[m.version], kind=m.kind, created=m.created,
                current=m.version == current, promoted=m.version in promoted,
                eval_summary=EvalSummary.model_validate(summary) if summary else None,
                gate_reasons=(summary or {}).get("gate_reasons", []), rubric=rubric.get(m.version, {}),
                parent_rubric=rubric.get(m.parent, {}) if m.parent else {},
                run_id=run.run_id if run else m.metrics.get("run_id"),
                curves_url=self._file_url(run, "metrics.png", "curves.png")))
        return VersionsPage(current=current, versions=out)

    def run_file(self, run_id: str, name: str) -> Path | None:
        """A file of a run's directory the console offers (curves, the blinded sheet), or None."""
        run = next((r for r in self.runner.runs() if r.run_id == run_id), None)
        if run is None or not run.run_dir:
            return None
        path = Path(run.run_dir) / name
        return path if path.is_file() else None

    def _file_url(self, run: RunRecord | None, name: str, route: str) -> str | None:
        return f"{API}/runs/{run.run_id}/{route}" if run and self.run_file(run.run_id, name) else None

    def runs(self) -> RunsPage:
        records = sorted(self.runner.runs(), key=lambda r: r.started, reverse=True)
        return RunsPage(runs=[RunView(
            record=r.model_copy(update={"new_pair_ids": [], "stale_pair_ids": []}),
            blinded_eval_url=self._file_url(r, "blinded_eval.csv", "blinded_eval.csv"),
            curves_url=self._file_url(r, "metrics.png", "curves.png")) for r in records])

    # -- pairs -----------------------------------------------------------------
    def _events(self) -> list[PreferenceEvent]:
        """Every ledger pair, newest first; read again only when the ledger grew (it is append-only)."""
        size = len(self.ledger)
        if self._cache[0] != size:
            order = {i: n for n, i in enumerate(self.ledger.ids)}
            events = sorted(self.ledger.events(), key=lambda e: order.get(e.id, -1), reverse=True)
            self._cache = (size, events)
        return self._cache[1]

    def pairs(self, where: PairFilter, offset: int, limit: int) -> PairsPage:
        hits = [e for e in self._events() if where(e)]
        return PairsPage(total=len(hits), offset=offset, limit=limit, pairs=[PairView(
            id=e.id, prompt_id=e.prompt_id, prompt=e.prompt_messages, chosen=e.chosen, rejected=e.rejected,
            source=e.source, judge_id=e.judge_id, reasoning=e.reasoning, chosen_scores=e.chosen_scores,
            rejected_scores=e.rejected_scores, policy_version=e.policy_version, split=e.split,
            created_at=e.created_at) for e in hits[offset:offset + limit]])

    def export_jsonl(self, where: PairFilter) -> Iterator[str]:
        """TRL's conversational preference rows (`prompt`/`chosen`/`rejected` + provenance), one per line."""
        for e in self._events():
            if where(e):
                yield json.dumps(to_trl_row(e)) + "\n"

    def export_parquet(self, where: PairFilter, path: Path) -> Path:
        """The same rows as parquet through `datasets` (ImportError when it is not installed)."""
        import datasets

        rows = [to_trl_row(e) for e in self._events() if where(e)]
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path

    # -- judge health --------------------------------------------------------------
    def judge_health(self, bucket_seconds: int) -> JudgeHealth:
        def bucket_of(at: datetime) -> datetime:
            ts = at.timestamp()
            return datetime.fromtimestamp(ts - ts % bucket_seconds, timezone.utc)

        sources: dict[datetime, Counter[str]] = defaultdict(Counter)
        longer: dict[datetime, list[int]] = defaultdict(lambda: [0, 0])  # [longer chosen, unequal lengths]
        for e in self._events():
            b = bucket_of(e.created_at)
            sources[b][e.source] += 1
            if e.source == "judge" and len(e.chosen) != len(e.rejected):
                longer[b][0] += len(e.chosen) > len(e.rejected)
                longer[b][1] += 1
        abstained: dict[datetime, Counter[str]] = defaultdict(Counter)
        for a in self.review.abstentions():
            abstained[bucket_of(a.created_at)][a.reason] += 1
        dead: dict[datetime, Counter[str]] = defaultdict(Counter)
        for at, kind in self.dead_letters.records():
            dead[bucket_of(at)][kind] += 1
        starts = sorted(set(sources) | set(abstained) | set(dead))
        buckets = [_bucket(s, sources[s], abstained[s], longer[s], dead[s]) for s in starts]
        total = _bucket(starts[0] if starts else datetime.now(timezone.utc), sum(sources.values(), Counter()),
                        sum(abstained.values(), Counter()),
                        [sum(v[0] for v in longer.values()), sum(v[1] for v in longer.values())],
                        sum(dead.values(), Counter()))
        return JudgeHealth(bucket_seconds=bucket_seconds, total=total, buckets=buckets)


def _bucket(start: datetime, sources: Counter[str], abstained: Counter[str], longer: list[int],
            dead: Counter[str]) -> HealthBucket:
    judged = sources["judge"] + sources["user"] + sum(abstained.values())

    def rate(part: int, whole: int) -> float | None:
        return round(part / whole, 3) if whole else None

    return HealthBucket(
        start=start, judge_preferences=sources["judge"], user_preferences=sources["user"],
        human_preferences=sources["human"], abstentions=dict(abstained),
        swap_consistency=rate(sources["judge"], sources["judge"] + abstained["inconsistent"]),
        tie_rate=rate(abstained["tie"], judged), abstain_rate=rate(sum(abstained.values()), judged),
        longer_chosen_rate=rate(longer[0], longer[1]), dead_letters=dict(dead))

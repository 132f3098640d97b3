"""The preference ledger's loader on real segment files: only a torn last line is cut; a bad
line elsewhere is reported and skipped, and everything after it is kept."""

from services.trainer.ledger import PreferenceLedger
from shared.wire import PreferenceEvent
from tests.helpers import prompt


def pairs(n: int, tag: str = "q") -> list[PreferenceEvent]:
    return [PreferenceEvent(producer="judge", prompt_id=p.id, prompt_messages=p.messages, chosen="See a doctor.",
                            rejected="It is nothing.", source="judge", judge_id="rubric-v1", policy_version="v0001")
            for p in (prompt(f"{tag} question {i}") for i in range(n))]


def segment(tmp_path):
    (seg,) = (tmp_path / "segments").glob("*.jsonl")
    return seg


def test_a_bad_line_in_the_middle_is_reported_and_skipped_and_the_rows_after_it_are_kept(tmp_path):
    events = pairs(5)
    PreferenceLedger(tmp_path).append(events)
    seg = segment(tmp_path)
    lines = seg.read_bytes().splitlines(keepends=True)
    seg.write_bytes(b"".join(lines[:2]) + b'{"id": "prf-broken", "chosen": \n' + b"".join(lines[2:]))
    size = seg.stat().st_size

    ledger = PreferenceLedger(tmp_path)
    assert ledger.ids == [e.id for e in events]  # all five, the three after the bad line too
    assert len(ledger.skipped) == 1 and ledger.skipped[0].startswith(f"{seg.name}:3:")
    assert seg.stat().st_size == size  # nothing cut
    assert [e.id for e in ledger.events()] == ledger.ids  # events() agrees

    more = pairs(2, "later")
    assert ledger.append(more) == 2
    reopened = PreferenceLedger(tmp_path)
    assert reopened.ids == [e.id for e in events + more] and len(reopened.skipped) == 1


def test_only_a_torn_last_line_is_cut(tmp_path):
    events = pairs(3)
    PreferenceLedger(tmp_path).append(events)
    seg = segment(tmp_path)
    whole = seg.read_bytes()
    seg.write_bytes(whole + pairs(1, "torn")[0].model_dump_json().encode()[:40])  # a crash mid-append

    ledger = PreferenceLedger(tmp_path)
    assert ledger.ids == [e.id for e in events] and ledger.skipped == []
    assert seg.read_bytes() == whole
    assert ledger.append(pairs(1, "next")) == 1 and len(PreferenceLedger(tmp_path)) == 4


def test_a_complete_last_record_without_its_newline_is_kept_and_the_next_append_starts_a_new_line(tmp_path):
    events = pairs(2)
    PreferenceLedger(tmp_path).append(events)
    seg = segment(tmp_path)
    seg.write_bytes(seg.read_bytes().rstrip(b"\n"))

    ledger = PreferenceLedger(tmp_path)
    assert ledger.ids == [e.id for e in events]
    ledger.append(pairs(1, "after"))
    reopened = PreferenceLedger(tmp_path)
    assert len(reopened) == 3 and reopened.skipped == [] and len(reopened.events()) == 3

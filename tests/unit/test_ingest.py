"""Ingest: field rules of the seed datasets, unusable rows reported, dedupe, split, parse errors."""

import json

import pytest

from shared.prompts import DEMO_PROMPTS, IngestError, build_events, split_for


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_seed_shapes_map_to_prompts_with_system_prompt_and_reference(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "Answer the question.", "input": "What causes migraines?", "output": "Several things."},
        {"prompt": "How do I sleep better?"},
        {"messages": [{"role": "user", "content": "I feel sad."}, {"role": "assistant", "content": "I hear you."}]},
    ])
    events, report = build_events(src, system_prompt="SYS", eval_fraction=0.0)
    assert report.usable == 3 and report.unusable == 0 and report.train == 3
    assert [e.messages[-1].content for e in events] == ["What causes migraines?", "How do I sleep better?", "I feel sad."]
    assert all(e.messages[0].role == "system" and e.messages[0].content == "SYS" for e in events)
    assert [e.reference_answer for e in events] == ["Several things.", None, "I hear you."]


def test_empty_rows_are_counted_with_row_numbers_and_duplicates_dropped(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"input": "", "output": "orphan answer"}, {"prompt": "   "}, {"prompt": "Real question?"},
        {"prompt": "Real question?"}, {"messages": [{"role": "assistant", "content": "only an answer"}]},
    ])
    events, report = build_events(src, eval_fraction=0.0)
    assert len(events) == 1 and report.duplicates == 1 and report.unusable == 3
    assert [line.split(":")[0] for line in report.unusable_rows] == ["row 1", "row 2", "row 5"]


def test_parse_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(IngestError, match=r"bad.jsonl:2: not valid JSON"):
        build_events(str(bad))
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt\n"unclosed\n')
    with pytest.raises(IngestError, match=r"p.csv:\d+: CSV error"):
        build_events(str(csv_file))
    with pytest.raises(IngestError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        build_events(str(tmp_path / "x.txt"))


def test_csv_json_and_parquet_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.csv").write_text("input,output\nWhy do I cough?,Many reasons.\n")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "Is a rash serious?"}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "Why am I tired?"}]), tmp_path / "p.parquet")
    for name, question in (("p.csv", "Why do I cough?"), ("p.json", "Is a rash serious?"), ("p.parquet", "Why am I tired?")):
        events, _ = build_events(str(tmp_path / name))
        assert events[0].messages[-1].content == question


def test_split_is_deterministic_and_close_to_the_fraction():
    events, report = build_events(str(DEMO_PROMPTS), eval_fraction=0.2)
    again, _ = build_events(str(DEMO_PROMPTS), eval_fraction=0.2)
    assert [e.split for e in events] == [e.split for e in again]
    assert 200 <= report.usable == len(events) and 0.1 < report.eval / report.usable < 0.3
    assert all(e.split == split_for(e.id, 0.2) for e in events)


def test_a_prompt_too_large_for_the_pipeline_is_a_counted_reported_rejection(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "A normal question?"},
                                              {"messages": [{"role": "user", "content": "x" * 30_000}] * 9},
                                              {"prompt": "Another question?"}])
    events, report = build_events(src, eval_fraction=0.0, max_prompt_bytes=100_000)
    assert [e.messages[-1].content for e in events] == ["A normal question?", "Another question?"]
    assert report.too_large == 1 and report.unusable == 0 and report.usable == 2
    assert report.unusable_rows[0].startswith("row 2: the prompt event is") and "limit of 100000" in report.unusable_rows[0]

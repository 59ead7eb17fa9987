import json

import pytest

from evaluation.runner import SOURCES
from evaluation.sources import DataSourceError, load_rows


def test_every_benchmark_has_a_fixture_with_its_hub_columns(fixtures_dir):
    from evaluation.multiple_choice import DEV_SOURCES

    for name, source in {**SOURCES, **{s.name: s for s in DEV_SOURCES.values()}}.items():
        rows = load_rows(source, fixtures_dir)
        assert 2 <= len(rows) <= 5, name
        assert set(source.columns) <= set(rows[0]), name


def test_nesting_survives_local_loading(fixtures_dir):
    (row,) = load_rows(SOURCES["pubmedqa"], fixtures_dir, limit=1)
    assert isinstance(row["context"]["contexts"], list)
    assert isinstance(load_rows(SOURCES["medqa"], fixtures_dir)[0]["options"], dict)


def test_missing_local_file_names_the_file_and_the_hub_source(tmp_path):
    with pytest.raises(DataSourceError, match=r"gsm8k\.jsonl.*openai/gsm8k \(main\), split test"):
        load_rows(SOURCES["gsm8k"], tmp_path)


def test_missing_column_is_named(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(DataSourceError, match=r"lacks column\(s\) \['answer'\]"):
        load_rows(SOURCES["gsm8k"], tmp_path)


def test_hub_loading_failure_says_what_to_do(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(DataSourceError, match=r"cannot load benchmark 'tfns' from zeroshot/.*--data-dir"):
        load_rows(SOURCES["tfns"])


def test_hub_arguments():
    assert SOURCES["gsm8k"].hub_kwargs() == {"path": "openai/gsm8k", "name": "main", "split": "test", "revision": None}
    fpb = SOURCES["fpb"].hub_kwargs()
    assert fpb["revision"] == "refs/convert/parquet" and fpb["data_dir"] == "sentences_50agree"
    assert SOURCES["vicuna"].hub_kwargs()["path"] == "json"


def sorted_by_subject(subjects: int, per_subject: int) -> list[dict]:
    """Rows sorted by subject, as cais/mmlu's test split is."""
    return [{"subject": f"s{s:02d}", "i": s * per_subject + i} for s in range(subjects) for i in range(per_subject)]


def test_limit_takes_a_seeded_sample_stratified_by_subject_not_the_first_rows():
    from evaluation.sources import sample_rows

    rows = sorted_by_subject(57, 100)
    picked = sample_rows(rows, 200, seed=0, stratify="subject")
    assert len(picked) == 200 and len({r["subject"] for r in picked}) == 57  # the first 200 hold two subjects
    assert picked != rows[:200] and [r["i"] for r in picked] == sorted(r["i"] for r in picked)
    assert sample_rows(rows, 200, seed=0, stratify="subject") == picked  # the same seed, the same rows
    assert sample_rows(rows, 200, seed=1, stratify="subject") != picked
    assert sample_rows(rows, 10, seed=0, stratify="subject") != rows[:10]
    assert sample_rows(rows, None, seed=0) == rows and sample_rows(rows[:3], 5, seed=0) == rows[:3]


def test_stratified_shares_follow_each_subjects_size():
    from collections import Counter

    from evaluation.sources import sample_rows

    rows = [{"subject": "big", "i": i} for i in range(300)] + [{"subject": "small", "i": i} for i in range(100)]
    assert Counter(r["subject"] for r in sample_rows(rows, 40, seed=3, stratify="subject")) == {"big": 30, "small": 10}


def test_mmlu_limit_is_stratified_by_subject_through_load_benchmark(fixtures_dir):
    from evaluation.sources import load_benchmark

    rows, origin = load_benchmark(SOURCES["mmlu"], fixtures_dir, limit=2, seed=0)
    assert len(rows) == 2 and len({r["subject"] for r in rows}) == 2
    assert origin["rows"] == 2 and origin["of"] == 4 and "stratified by subject" in origin["sample"]


def test_local_rows_name_the_local_file_and_its_hash_not_the_hub(fixtures_dir):
    import hashlib

    from evaluation.sources import load_benchmark

    _, origin = load_benchmark(SOURCES["gsm8k"], fixtures_dir)
    path = fixtures_dir / "gsm8k.jsonl"
    assert origin["kind"] == "local file" and origin["location"] == str(path.resolve())
    assert origin["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and "sample" not in origin

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

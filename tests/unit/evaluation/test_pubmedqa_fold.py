"""PubMedQA is scored on the board's 500 test-set questions, picked from the 1000 labelled rows by PubMed id."""

import json

import pytest
from datasets import Dataset

from evaluation.multiple_choice import SOURCES
from evaluation.pubmedqa_fold import TEST_PUBIDS, select_pubids
from evaluation.sources import DataSourceError


def _labelled_rows(fixtures_dir, pubids):
    """The fixture's invented rows, repeated under the given PubMed ids (the Hub's 1000 rows in shape)."""
    rows = [json.loads(line) for line in (fixtures_dir / "pubmedqa.jsonl").read_text().splitlines()]
    return Dataset.from_list([{**rows[i % len(rows)], "pubid": pubid} for i, pubid in enumerate(pubids)])


def test_the_fold_is_500_distinct_pubmed_ids():
    assert len(TEST_PUBIDS) == len(set(TEST_PUBIDS)) == 500
    assert list(TEST_PUBIDS) == sorted(TEST_PUBIDS)


def test_the_hub_source_keeps_exactly_the_test_sets_500_of_the_1000_labelled_rows(fixtures_dir):
    others = [40_000_000 + i for i in range(500)]  # the 500 cross-validation questions, not scored by the board
    ds = _labelled_rows(fixtures_dir, [*others[:250], *TEST_PUBIDS, *others[250:]])
    kept = SOURCES["pubmedqa"].select(ds)
    assert len(ds) == 1000 and len(kept) == 500
    assert sorted(kept["pubid"]) == list(TEST_PUBIDS)
    assert set(kept.column_names) == set(ds.column_names)  # the rows themselves are untouched


def test_rows_missing_from_the_fold_fail_the_load_naming_how_many(fixtures_dir):
    ds = _labelled_rows(fixtures_dir, TEST_PUBIDS[:-3])
    with pytest.raises(DataSourceError, match="pubmedqa: 3 of the 500 test-set PubMed ids are not among the 497"):
        select_pubids(ds)

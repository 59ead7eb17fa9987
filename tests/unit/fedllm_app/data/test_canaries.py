"""The exposure audit's canaries: drawn from their own seed, inserted into one partition's training rows only."""

import logging

import pytest

from fedllm_app.config import ConfigError, load_config
from fedllm_app.data import pipeline
from fedllm_app.data.canaries import DOMAIN, RESPONSE_PREFIX, CanarySpec, insert, make_canaries

ON = "privacy.canaries.count=3 privacy.canaries.repeats=5 privacy.canaries.partition=2 privacy.canaries.digits=4"


def canary_rows(rows):
    return [r for r in rows if r.get("domain") == DOMAIN]


def test_canaries_are_a_pure_function_of_their_seed_and_distinct():
    spec = CanarySpec(count=20, digits=3, seed=7)
    first, again = make_canaries(spec), make_canaries(spec)
    assert first == again
    assert len({c.secret for c in first}) == 20
    assert all(len(c.secret) == 3 and c.secret.isdigit() for c in first)
    assert [c.secret for c in make_canaries(CanarySpec(count=20, digits=3, seed=8))] != [c.secret for c in first]
    assert first[0].row()["response"] == RESPONSE_PREFIX + first[0].secret


def test_the_run_seed_does_not_change_the_canaries():
    """The server rebuilds them from privacy.canaries alone, whatever the run's seed."""
    a = CanarySpec.from_config(load_config({"overrides": f"{ON} seed=1"}))
    b = CanarySpec.from_config(load_config({"overrides": f"{ON} seed=2"}))
    assert make_canaries(a) == make_canaries(b)


def test_only_the_named_partition_gets_the_canaries_repeated_and_never_the_heldout_rows():
    cfg = load_config({"overrides": ON})
    plain = pipeline.all_partitions(load_config({}))
    parts = pipeline.all_partitions(cfg)
    spec = CanarySpec.from_config(cfg)
    secrets = sorted(c.secret for c in make_canaries(spec))
    got = canary_rows(parts[2])
    assert len(got) == 3 * 5
    assert sorted({r["response"].removeprefix(RESPONSE_PREFIX) for r in got}) == secrets
    assert [r for r in parts[2] if r.get("domain") != DOMAIN] == plain[2], "the partition's own rows changed"
    for pid in (0, 1, 3):
        assert parts[pid] == plain[pid]
    assert not canary_rows(pipeline.heldout(cfg)) and pipeline.heldout(cfg) == pipeline.heldout(load_config({}))
    assert not any(s in r["response"] for r in pipeline.heldout(cfg) for s in secrets)


def test_the_copies_land_among_the_rows_not_all_at_the_end():
    parts = [[{"instruction": str(i), "response": "x", "domain": "d"} for i in range(100)], []]
    out = insert(parts, CanarySpec(count=2, repeats=10, partition=0, digits=3))
    where = [i for i, r in enumerate(out[0]) if r["domain"] == DOMAIN]
    assert len(out[0]) == 120 and len(where) == 20 and where[0] < 100
    assert out[1] is parts[1] and len(parts[0]) == 100, "the input was modified"


def test_count_zero_leaves_the_split_as_it_was():
    assert pipeline.all_partitions(load_config({"overrides": "privacy.canaries.count=0"})) == pipeline.all_partitions(
        load_config({})
    )


def test_the_canary_partition_says_so_once(caplog):
    cfg = load_config({"overrides": f"{ON} privacy.canaries.seed=99"})
    with caplog.at_level(logging.INFO, logger="fedllm"):
        pipeline.partition(cfg, 1)
        pipeline.partition(cfg, 2)
        pipeline.partition(cfg, 2)
    lines = [r.getMessage() for r in caplog.records if "privacy.canaries" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("client 2: privacy.canaries: 3 secret(s) of 4 digits")


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("privacy.canaries.count=-1", r"privacy.canaries.count=-1 must be >= 0"),
        ("privacy.canaries.count=2 privacy.canaries.repeats=0", r"privacy.canaries.repeats=0 must be at least 1"),
        ("privacy.canaries.count=2 privacy.canaries.partition=4", r"privacy.canaries.partition=4 is outside 0..3"),
        ("privacy.canaries.count=2 privacy.canaries.partition=-1", r"privacy.canaries.partition=-1 is outside 0..3"),
        ("privacy.canaries.count=2 privacy.canaries.digits=0", r"privacy.canaries.digits=0 must be in 1..9"),
        ("privacy.canaries.count=2 privacy.canaries.digits=12", r"privacy.canaries.digits=12 must be in 1..9"),
        ("privacy.canaries.count=11 privacy.canaries.digits=1", r"count=11 distinct secrets do not fit in 10\^1"),
        ("privacy.canaries.count=2 privacy.canaries.method=guess", r"privacy.canaries.method='guess' must be one of"),
        ("privacy.canaries.count=2 privacy.canaries.sample=10", r"privacy.canaries.sample=10 must be at least 100"),
        ("privacy.canaries.count=2.5", r"privacy.canaries.count=2.5 must be an integer"),
        ("privacy.canaries.count=2 task=dpo", r"privacy.canaries with task=dpo: .* task=sft"),
        ("privacy.canaries.count=2 strategy=local", r"privacy.canaries with strategy=local"),
    ],
)
def test_bad_canary_settings_fail_naming_the_key_and_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": override})

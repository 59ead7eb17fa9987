"""Client sizes of every partitioner (flwr-datasets' and the built-in dominance split), and their errors."""

import pytest

from fedllm_app.config import ConfigError, load_config
from fedllm_app.data import pipeline as data
from fedllm_app.data import synthetic
from fedllm_app.data.partitions import split, split_by_dominance


def parts_for(overrides: str):
    return data.all_partitions(load_config({"overrides": overrides}))


def test_default_synthetic_split_is_the_unchanged_dominance_benchmark():
    cfg = load_config({})
    assert cfg.partition.name == "dominance" and cfg.partition.dominance == 0.9
    train, _ = synthetic.train_test(800, 50, 0)
    expected = split_by_dominance([r.as_dict() for r in train], 4, 0.9, 0)
    assert data.all_partitions(cfg) == expected
    for i, part in enumerate(data.all_partitions(cfg)):
        assert len(part) == 798
        assert data.domain_mix(part)[synthetic.DOMAINS[i]] == 720


def test_iid_gives_equal_shards_with_every_domain():
    parts = parts_for("partition=iid")
    assert [len(p) for p in parts] == [800, 800, 800, 800]
    assert all(len(data.domain_mix(p)) == 4 for p in parts)
    ids = [id(r) for p in parts for r in p]
    assert len(set(ids)) == 3200, "a row was given to two clients"


def test_iid_catalogue_dataset_with_uneven_rows():
    parts = parts_for("partition=iid num_clients=3 sample_clients=3 dataset.train_per_domain=25")
    assert sorted(len(p) for p in parts) == [33, 33, 34]


@pytest.mark.parametrize("alpha", [0.3, 100.0])
def test_dirichlet_sizes_cover_every_row_and_skew_with_alpha(alpha, caplog):
    parts = parts_for(f"partition=dirichlet partition.alpha={alpha}")
    assert "InnerDirichletPartitioner" not in caplog.text, "a split DirichletPartitioner can draw needs no fallback"
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 3200 and min(sizes) >= 16  # at least one batch (training.batch_size) each
    shares = [max(data.domain_mix(p).values()) / len(p) for p in parts]
    if alpha < 1:
        assert max(shares) > 0.45, "alpha 0.3 should give some client a dominant domain"
    else:
        assert max(shares) < 0.35 and max(sizes) - min(sizes) < 200


def test_natural_gives_one_client_per_value():
    parts = parts_for("partition=natural partition.by=domain")
    assert [len(p) for p in parts] == [800] * 4
    assert sorted(next(iter(data.domain_mix(p))) for p in parts) == sorted(synthetic.DOMAINS)
    assert all(len(data.domain_mix(p)) == 1 for p in parts)


def test_natural_with_another_number_of_clients_names_the_fix():
    with pytest.raises(ConfigError, match=r"has 4 distinct values, so 4 clients, but num_clients=2; set num_clients=4"):
        parts_for("partition=natural num_clients=2 sample_clients=2")


@pytest.mark.parametrize(("k", "sizes"), [(1, [800, 800, 800, 800]), (2, [1200, 667, 667, 666])])
def test_pathological_sizes_and_classes_per_client(k, sizes):
    parts = parts_for(f"partition=pathological partition.classes_per_client={k}")
    assert [len(p) for p in parts] == sizes
    assert all(len(data.domain_mix(p)) == k for p in parts)


def test_dominance_share_sets_client_sizes():
    # 2 clients at 50%: 600 rows of the home domain + 200 of each other; the home domain's 800 rows cap it.
    parts = parts_for("partition=dominance partition.dominance=0.5 num_clients=2 sample_clients=2")
    assert [len(p) for p in parts] == [1200, 1200]
    assert data.domain_mix(parts[0]) == {"arithmetic": 200, "reverse": 600, "sentiment": 200, "units": 200}


def test_zero_rows_for_a_client_names_it():
    with pytest.raises(ConfigError, match=r"partition=iid gave client 4 no rows \(4 rows over 5 clients\)"):
        parts_for("partition=iid dataset.train_per_domain=1 num_clients=5 sample_clients=5")


def test_dirichlet_with_too_few_rows_for_a_batch_per_client_names_the_fix():
    with pytest.raises(ConfigError) as err:
        parts_for("partition=dirichlet partition.alpha=0.05 dataset.train_per_domain=10 training.batch_size=16")
    msg = str(err.value)
    assert "partition=dirichlet partition.alpha=0.05 could not give each of the 4 clients one batch" in msg
    assert "(training.batch_size=16 rows) from 40 rows, whatever the split" in msg
    assert "lower num_clients or training.batch_size, or use more data (at least 64 rows)" in msg


def test_dirichlet_point_one_over_twenty_clients_gives_each_a_batch_with_skewed_mixes(caplog):
    """The paper's client setting on the built-in data: 4 domains at alpha 0.1 leave most of 20 clients empty
    under DirichletPartitioner's draws; each client then gets an equal share with a Dirichlet(0.1) domain mix."""
    overrides = "partition=dirichlet partition.alpha=0.1 num_clients=20 sample_clients=2"
    parts = parts_for(overrides)
    assert [len(p) for p in parts] == [160] * 20  # 3200 rows, every one used once
    assert len({id(r) for p in parts for r in p}) == 3200
    shares = [max(data.domain_mix(p).values()) / len(p) for p in parts]
    assert sum(shares) / 20 > 0.5 and max(shares) > 0.8, shares  # an IID split gives about 0.3
    assert "20 clients without one batch (training.batch_size=16 rows); instead each" in caplog.text
    cfg = load_config({"overrides": overrides})
    rows = [r.as_dict() for r in synthetic.train_test(800, 50, 0)[0]]
    again = split(rows, cfg.partition, 20, cfg.seed, cfg.training.batch_size)  # anew, not the pipeline's cache
    assert again == parts, "the fallback split must follow the seed"


def test_partition_by_a_missing_column_lists_the_columns():
    with pytest.raises(ConfigError, match=r"no column 'user'.*columns: domain, instruction, response"):
        parts_for("partition=natural partition.by=user")


def test_bad_partition_values_fail_at_config_time():
    with pytest.raises(ConfigError, match=r"partition.alpha=0 must be positive"):
        load_config({"overrides": "partition=dirichlet partition.alpha=0"})
    with pytest.raises(ConfigError, match=r"partition.dominance=1.5 must be in \(0, 1\]"):
        load_config({"overrides": "partition.dominance=1.5"})

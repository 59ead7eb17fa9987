"""How a run ends when its rounds aggregate nothing: the summary counts the rounds, and the run fails loudly."""

import json

import pytest

from fedllm_app.client import faults
from fedllm_app.server.run import NoRoundAggregated, aggregation_counts
from tests.fakes import FakeGrid, trained_reply


def test_the_summary_counts_aggregated_rounds_and_names_the_others():
    rows = [{"round": 1, "aggregated": True}, {"round": 2, "aggregated": False}, {"round": 3}]
    assert aggregation_counts(rows, "fedavg") == {"rounds_aggregated": 2, "rounds_not_aggregated": [2]}
    assert aggregation_counts(rows, "local") == {}  # the local-only baseline aggregates nothing by design


@pytest.mark.slow
def test_a_run_whose_every_round_lost_all_clients_fails_and_publishes_nothing(tmp_path):
    from fedllm_app.config import load_config
    from fedllm_app.server.run import FederatedRun

    over = "num_rounds=2 num_clients=2 sample_clients=2 dataset.test_per_domain=1 baseline=none"
    cfg = load_config({"overrides": over}, [f"output_dir={tmp_path}", "run_name=lost"])
    grid = FakeGrid(2, reply=lambda msg: faults.corrupt(trained_reply(msg), "zero_examples"))  # every reply invalid
    run = FederatedRun(cfg, started=0.0)
    run.federated(grid)
    with pytest.raises(NoRoundAggregated, match="none of the 2 rounds was aggregated.*min_replies=1"):
        run.finish()
    summary = json.loads((tmp_path / "lost" / "summary.json").read_text())
    assert summary["rounds_aggregated"] == 0 and summary["rounds_not_aggregated"] == [1, 2]
    card = tmp_path / "lost" / "checkpoints" / "round-2" / "README.md"  # PEFT's stub; fedllm's card adds results
    assert "## Held-out results" not in card.read_text()

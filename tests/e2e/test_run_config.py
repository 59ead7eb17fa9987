"""Through `flwr run`: declared run-config keys reach the app, and a simulation's clients are its SuperNodes."""

import json
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def rounds_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_config_keys_reach_the_app_and_a_plain_run_takes_the_simulated_supernodes_as_clients(flower, tmp_path):
    # No num-clients anywhere: the simulation's 2 SuperNodes are the clients (conf/config.yaml says 4).
    run_config = f"num-server-rounds=2 local-steps=1 baseline='none' output-dir='{tmp_path}' run-name='plain'"
    status, log = flower.run("dataset.test_per_domain=2", num_supernodes=2, run_config=run_config)
    assert status == "finished:completed", log[-3000:]
    assert "simulation with 2 SuperNodes: num_clients=2, sample_clients=2" in log
    records = rounds_of(tmp_path / "plain")
    assert [(r["round"], r["num_rounds"], r["sampled"], r["replied"]) for r in records] == [(1, 2, 2, 2), (2, 2, 2, 2)]
    assert sorted(e["partition"] for e in records[0]["bytes_by_node"].values()) == [0, 1]
    saved = (tmp_path / "plain" / "config.yaml").read_text()
    assert "num_clients: 2" in saved and "max_steps: 1" in saved


def test_a_num_clients_the_simulation_lacks_fails_at_once_with_the_fix(flower, tmp_path):
    start = time.monotonic()
    status, log = flower.run(
        f"node_wait_timeout=300 output_dir={tmp_path}", num_supernodes=2, timeout=280, run_config="num-clients=4"
    )
    assert status == "finished:failed"
    assert 'num_clients=4 but this simulation has 2 SuperNodes; run with --federation-config "num-supernodes=4"' in log
    assert time.monotonic() - start < 150, "waited for nodes instead of failing at once"

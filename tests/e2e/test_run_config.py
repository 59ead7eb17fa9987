"""Through `flwr run`: declared run-config keys reach the app, and a simulation's clients are its SuperNodes."""

import json
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SMALL = "training.max_steps=1 baseline=none dataset.test_per_domain=2"


def rounds_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_config_keys_set_the_rounds_and_the_clients(flower, tmp_path):
    run_config = (
        f"num-server-rounds=2 num-clients=2 local-steps=1 baseline='none' output-dir='{tmp_path}' run-name='rc'"
    )
    status, log = flower.run("dataset.test_per_domain=2", num_supernodes=2, run_config=run_config)
    assert status == "finished:completed", log[-3000:]
    assert [(r["round"], r["num_rounds"], r["replied"]) for r in rounds_of(tmp_path / "rc")] == [(1, 2, 2), (2, 2, 2)]


def test_plain_flwr_run_uses_the_simulated_supernodes_as_clients(flower, tmp_path):
    status, log = flower.run(f"num_rounds=1 {SMALL} output_dir={tmp_path} run_name=plain", num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    assert "simulation with 2 SuperNodes: num_clients=2, sample_clients=2" in log
    (record,) = rounds_of(tmp_path / "plain")
    assert (record["sampled"], record["replied"], record["failed"]) == (2, 2, 0)
    assert sorted(e["partition"] for e in record["bytes_by_node"].values()) == [0, 1]
    assert "num_clients: 2" in (tmp_path / "plain" / "config.yaml").read_text()


def test_a_num_clients_the_simulation_lacks_fails_at_once_with_the_fix(flower, tmp_path):
    start = time.monotonic()
    status, log = flower.run(
        f"node_wait_timeout=300 output_dir={tmp_path}", num_supernodes=2, timeout=280, run_config="num-clients=4"
    )
    assert status == "finished:failed"
    assert 'num_clients=4 but this simulation has 2 SuperNodes; run with --federation-config "num-supernodes=4"' in log
    assert time.monotonic() - start < 150, "waited for nodes instead of failing at once"

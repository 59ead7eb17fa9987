"""How many clients a run has: a simulation adapts to its SuperNodes unless num_clients was set; a deployment waits."""

import time

import pytest
from flwr.superlink.grid import InMemoryGrid

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.nodes import check_nodes, settled_node_count, simulation_clients


def decide(nodes, num_clients=4, sample_clients=4, num_clients_set=False, sample_clients_set=False):
    return simulation_clients(
        nodes, num_clients, sample_clients, num_clients_set=num_clients_set, sample_clients_set=sample_clients_set
    )


def test_an_unset_num_clients_becomes_the_simulated_supernodes():
    assert decide(2) == 2
    assert decide(6) == 6


def test_a_set_num_clients_equal_to_the_supernodes_is_kept():
    assert decide(4, num_clients=4, num_clients_set=True) == 4


def test_a_set_num_clients_other_than_the_supernodes_fails_with_the_fix():
    with pytest.raises(ConfigError) as err:
        decide(2, num_clients=4, num_clients_set=True)
    message = str(err.value)
    assert message.startswith("num_clients=4 but this simulation has 2 SuperNodes")
    assert '--federation-config "num-supernodes=4"' in message and "num-clients=2" in message


def test_a_set_sample_clients_above_the_supernodes_fails_with_the_fix():
    with pytest.raises(ConfigError, match=r'sample_clients=3 but this simulation has 2 SuperNodes.*"num-supernodes=3"'):
        decide(2, sample_clients=3, sample_clients_set=True)
    assert decide(4, sample_clients=3, sample_clients_set=True) == 4


def test_no_simulated_supernodes_fails_with_the_fix():
    with pytest.raises(ConfigError, match="registered no SuperNodes"):
        decide(0)


class FakeSimulationGrid(InMemoryGrid):
    """A simulation's grid whose nodes are registered ``delay`` seconds after the ServerApp starts."""

    def __init__(self, nodes: int, delay: float = 0.0) -> None:  # no LinkState: only the node ids are asked for
        self.nodes, self.ready_at = nodes, time.monotonic() + delay

    def get_node_ids(self):
        return list(range(1, self.nodes + 1)) if time.monotonic() >= self.ready_at else []


def test_the_node_count_settles_once_the_engine_has_registered_them():
    start = time.monotonic()
    assert settled_node_count(FakeSimulationGrid(3, delay=0.2), settle=0.1, limit=5) == 3
    assert time.monotonic() - start < 1.0


def test_a_simulation_without_num_clients_runs_with_its_supernodes(caplog):
    run_config = {"overrides": "num_rounds=1"}
    cfg = check_nodes(FakeSimulationGrid(2), load_config(run_config), run_config)
    assert (cfg.num_clients, cfg.sample_clients, cfg.num_rounds) == (2, 2, 1)
    assert "simulation with 2 SuperNodes: num_clients=2, sample_clients=2" in caplog.text
    assert '--federation-config "num-supernodes=N"' in caplog.text


def test_a_simulation_with_another_num_clients_fails_at_once():
    run_config = {"num-clients": 4}
    start = time.monotonic()
    with pytest.raises(ConfigError, match="num_clients=4 but this simulation has 2 SuperNodes"):
        check_nodes(FakeSimulationGrid(2), load_config(run_config), run_config)
    assert time.monotonic() - start < 5


def test_a_simulation_with_the_default_node_count_keeps_the_config():
    cfg = load_config({})
    assert check_nodes(FakeSimulationGrid(cfg.num_clients), cfg, {}) is cfg


class DeploymentGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(self.nodes))


def test_a_deployment_waits_node_wait_timeout_then_fails_with_the_numbers():
    cfg = load_config({"overrides": "node_wait_timeout=0.3"})
    start = time.monotonic()
    with pytest.raises(ValueError, match="1 SuperNodes are connected after waiting node_wait_timeout=0.3 s"):
        check_nodes(DeploymentGrid(1), cfg, {})
    assert time.monotonic() - start >= 0.3
    assert check_nodes(DeploymentGrid(4), cfg, {}) is cfg

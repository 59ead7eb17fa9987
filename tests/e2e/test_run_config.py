"""Through `flwr run`: declared run-config keys reach the app, and a simulation's clients are its SuperNodes,
also when the simulation runs on an existing multi-node Ray cluster (``RAY_ADDRESS``, docs/scale.md).
"""

import json
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def rounds_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def two_node_ray(flower):
    """Ray's own multi-node test cluster on this machine (two raylets, one CPU each), named to Flower by RAY_ADDRESS."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        flower.env["RAY_ADDRESS"] = cluster.address
        yield cluster
    finally:
        cluster.shutdown()


def client_actor_nodes(address):
    """The Ray node of every ClientAppActor the cluster ran, read from its actor table (GCS; no dashboard needed)."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive", n.get("alive"))}
        actors = ray._private.state.actors().values()  # ray.util.state needs the dashboard; the GCS table does not
        return nodes, [a["Address"]["NodeID"] for a in actors if a.get("ActorClassName") == "ClientAppActor"]
    finally:
        ray.shutdown()


def test_run_config_keys_reach_the_app_and_a_run_on_a_two_node_ray_cluster_places_clients_on_both_nodes(
    flower, two_node_ray, tmp_path
):
    # The simulation attaches to the existing cluster named by RAY_ADDRESS (Flower calls ray.init() with no
    # address); each node has one CPU and each client needs one, so the two clients must run on different nodes.
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
    nodes, placed = client_actor_nodes(two_node_ray.address)
    assert len(nodes) == 2 and set(placed) == nodes, (nodes, placed)


def test_a_num_clients_the_simulation_lacks_fails_at_once_with_the_fix(flower, tmp_path):
    start = time.monotonic()
    status, log = flower.run(
        f"node_wait_timeout=300 output_dir={tmp_path}", num_supernodes=2, timeout=280, run_config="num-clients=4"
    )
    assert status == "finished:failed"
    assert 'num_clients=4 but this simulation has 2 SuperNodes; run with --federation-config "num-supernodes=4"' in log
    assert time.monotonic() - start < 150, "waited for nodes instead of failing at once"

"""How many clients a run has, checked before anything is loaded.

In a deployment the server waits up to ``node_wait_timeout`` s for ``num_clients``
SuperNodes, then fails with the numbers and the fix. In a simulation (``flwr run .`` on
the local connection: the ServerApp gets an ``InMemoryGrid``) the simulated SuperNodes
are all registered at start, so there is nothing to wait for: a run that did not set
``num_clients`` takes as many clients as are simulated, and one that set another number
fails at once. The effective ``num_clients`` reaches the clients in every train message
(``num-clients``, see :mod:`strategies.fedavg`), so they compute the same partitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from omegaconf import DictConfig

from fedllm_app.config import ConfigError, load_config, user_set_keys
from fedllm_app.server.rounds import wait_for_nodes

log = logging.getLogger("fedllm")

# The simulation engine registers its SuperNodes right after the ServerApp's thread starts.
SETTLE_SECONDS = 0.3
SETTLE_LIMIT_SECONDS = 10.0


def check_nodes(grid: Grid, cfg: DictConfig, run_config: Mapping[str, Any]) -> DictConfig:
    """The config to run with: ``cfg``, or in a simulation ``cfg`` with ``num_clients`` set to its SuperNodes."""
    if not isinstance(grid, InMemoryGrid):
        wait_for_deployment_nodes(grid, cfg)
        return cfg
    nodes = settled_node_count(grid)
    user = user_set_keys(run_config)
    num_clients = simulation_clients(
        nodes,
        cfg.num_clients,
        cfg.sample_clients,
        num_clients_set="num_clients" in user,
        sample_clients_set="sample_clients" in user,
    )
    if num_clients == cfg.num_clients:
        return cfg
    adapted = load_config(run_config, extra=[f"num_clients={num_clients}"])
    log.info(
        f"simulation with {nodes} SuperNodes: num_clients={nodes}, sample_clients={adapted.sample_clients} "
        f'(for N clients run with --federation-config "num-supernodes=N")'
    )
    return adapted


def simulation_clients(
    nodes: int, num_clients: int, sample_clients: int, *, num_clients_set: bool, sample_clients_set: bool
) -> int:
    """The ``num_clients`` of a simulation with ``nodes`` SuperNodes: ``nodes``, unless the user set another number.

    Raises a ConfigError when the user's ``num_clients`` (or ``sample_clients``) asks for
    other clients than the simulation has; the message says how to get them.
    """
    if nodes < 1:
        raise ConfigError(
            f"the simulation registered no SuperNodes within {SETTLE_LIMIT_SECONDS:.0f} s; "
            f'run with --federation-config "num-supernodes=N" and N at least 1'
        )
    if num_clients_set and num_clients != nodes:
        raise ConfigError(
            f"num_clients={num_clients} but this simulation has {nodes} SuperNodes; run with "
            f'--federation-config "num-supernodes={num_clients}", or set num-clients={nodes} (or leave it unset)'
        )
    if sample_clients_set and sample_clients > nodes:
        raise ConfigError(
            f"sample_clients={sample_clients} but this simulation has {nodes} SuperNodes; run with "
            f'--federation-config "num-supernodes={sample_clients}", or set sample-clients to at most {nodes}'
        )
    return nodes


def settled_node_count(grid: Grid, settle: float = SETTLE_SECONDS, limit: float = SETTLE_LIMIT_SECONDS) -> int:
    """The number of nodes once it is positive and unchanged for ``settle`` s (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    count, since = len(list(grid.get_node_ids())), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(settle / 3)
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle:
            break
    return count


def wait_for_deployment_nodes(grid: Grid, cfg: DictConfig) -> None:
    """Fail clearly if, after ``node_wait_timeout`` s, the federation has not num_clients SuperNodes."""
    wait_seconds = cfg.node_wait_timeout
    connected = wait_for_nodes(grid, cfg.num_clients, wait_seconds, interval=0.1)
    if connected != cfg.num_clients:
        raise ValueError(
            f"{connected} SuperNodes are connected after waiting node_wait_timeout={wait_seconds} s but "
            f"num_clients={cfg.num_clients}; start {cfg.num_clients} SuperNodes or set num_clients={connected}"
        )

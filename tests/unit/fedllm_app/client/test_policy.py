"""Node policy: a run config cannot read a node's secrets or run code on it, and the server learns only a code.

Each leak is driven through the real ClientApp (``fedllm_app.client_app.app``) with a Flower Message and
Context of a deployment node; what reaches the server is ``str(exception)`` (Flower's error reply), which
must hold nothing of the node. The policy refuses before any model or data is loaded, so these are fast.
"""

import logging
import os

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm_app.client.policy import NodePolicy, PolicyError
from fedllm_app.client.round import round_config
from fedllm_app.client_app import ERRORS, NodeError, app
from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.run import build_strategy
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY
from strategies.records import to_record

SECRET = "hf_node_secret_0123456789"
NODE = {"partition-id": 0, "num-partitions": 2}


def message(rnd=1):
    config = ConfigRecord({"server-round": rnd, "lr": 1e-3, "mode": "federated"})
    arrays = to_record({"w": np.zeros(2, np.float32)})
    return Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), dst_node_id=1, message_type="train")


def server_sees(run_config, node_config=NODE, caplog=None):
    """What Flower would send back to the server when the ClientApp fails on this run config."""
    context = Context(run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config=run_config)
    with pytest.raises(NodeError) as err:
        app(message(), context)
    return str(type(err.value)) + ":<'" + str(err.value) + "'>"  # Flower's own format of the error reason


@pytest.fixture
def secrets(tmp_path, monkeypatch):
    """A node with a token in its environment, a YAML file and a CSV of private data on its disk."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (tmp_path / "leak").mkdir()
    (tmp_path / "leak" / "secret.yaml").write_text(f"value: {SECRET}\n")
    (tmp_path / "private.csv").write_text(f"{SECRET}_column,other\n1,2\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return tmp_path


def leaks(tmp):
    return {
        "the node's token through oc.env": {"overrides": "dataset.path='${oc.env:HF_TOKEN,none}'"},
        "oc.env in a declared key": {"dataset": "${oc.env:HF_TOKEN}"},
        "a YAML file through hydra.searchpath": {"overrides": f"hydra.searchpath=[file://{tmp}] +leak=secret"},
        "a local CSV through dataset.path": {"overrides": f"dataset=custom dataset.path={tmp}/private.csv"},
        "code shipped with a model folder": {"overrides": f"model.name={tmp}/model model.trust_remote_code=true"},
        "trust_remote_code alone": {"overrides": "model.trust_remote_code=true"},
        "a pickle through instantiate": {
            "overrides": "+strategy.x={_target_:pandas.read_pickle,filepath_or_buffer:/tmp/x.pkl}"
        },
        "a key deleted": {"overrides": "~dataset.heldout"},
        "a group outside the app's choices": {"model": "../../leak/secret"},
    }


@pytest.mark.parametrize(
    "name",
    [
        "the node's token through oc.env",
        "oc.env in a declared key",
        "a YAML file through hydra.searchpath",
        "a local CSV through dataset.path",
        "code shipped with a model folder",
        "trust_remote_code alone",
        "a pickle through instantiate",
        "a key deleted",
        "a group outside the app's choices",
    ],
)
def test_a_leak_is_refused_and_the_server_learns_only_a_code(name, secrets, caplog):
    with caplog.at_level(logging.ERROR, logger="fedllm"):
        seen = server_sees(leaks(secrets)[name])
    assert ERRORS[PolicyError] in seen
    assert SECRET not in seen and str(secrets) not in seen and "private" not in seen
    assert "PolicyError" in caplog.text  # the node's owner reads the details in the node's log


def test_a_node_pins_the_models_and_datasets_it_serves(caplog):
    pinned = {**NODE, "allowed-models": "meta-llama/Llama-2-7b-hf", "allowed-datasets": "alpaca_gpt4"}
    with caplog.at_level(logging.ERROR, logger="fedllm"):
        assert ERRORS[PolicyError] in server_sees({}, pinned)  # the default model is builtin:tiny
    assert "model 'builtin:tiny' is not in this node's allowed-models" in caplog.text
    open_models = {**NODE, "allowed-datasets": "alpaca_gpt4"}
    assert ERRORS[PolicyError] in server_sees({}, open_models)  # the default dataset is synthetic


def test_a_run_config_error_reaches_the_server_as_a_code_only(caplog):
    with caplog.at_level(logging.ERROR, logger="fedllm"):
        seen = server_sees({"overrides": "training.learning_rate=-1"})
    assert ERRORS[ConfigError] in seen and "learning_rate" not in seen
    assert "training.learning_rate=-1 must be positive" in caplog.text


def test_local_paths_and_trust_remote_code_come_from_the_node_config(secrets):
    policy = NodePolicy.from_node_config({**NODE, "model-path": str(secrets / "model")}, simulation=False)
    cfg = round_config({"overrides": "model.lora.r=4 training.max_steps=2"}, message(), policy)
    assert cfg.model.name == str(secrets / "model") and cfg.model.trust_remote_code is False
    assert cfg.model.lora.r == 4 and cfg.training.max_steps == 2  # hyperparameters stay the run's
    trusting = NodePolicy.from_node_config({**NODE, "trust-remote-code": "true"}, simulation=False)
    assert round_config({}, message(), trusting).model.trust_remote_code is True


def test_a_simulation_keeps_the_run_configs_local_files(secrets):
    run_config = {"overrides": f"dataset=custom dataset.path={secrets}/private.csv"}
    deployment = NodePolicy.from_node_config(NODE, simulation=False)
    with pytest.raises(PolicyError, match="dataset.path is set by the node's own config"):
        round_config(run_config, message(), deployment)
    for policy in (
        NodePolicy.from_node_config(NODE, simulation=True),
        NodePolicy.from_node_config({**NODE, "trust-run-config": True}, simulation=False),
    ):
        assert round_config(run_config, message(), policy).dataset.path == f"{secrets}/private.csv"
    # Even in a simulation: no interpolation, no hydra.*, no added or deleted keys.
    with pytest.raises(PolicyError, match="interpolation"):
        round_config({"overrides": "seed=${oc.env:HF_TOKEN}"}, message(), NodePolicy(trust_run_config=True))


def test_the_server_composes_no_interpolation_and_no_hydra_keys_either(secrets):
    with pytest.raises(ConfigError, match="holds an interpolation") as err:
        load_config({"overrides": "run_name=${oc.env:HF_TOKEN}"})
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="hydra.\\* keys cannot be set"):
        load_config({"overrides": f"hydra.searchpath=[file://{secrets}/leak] +leak=secret"})


def test_the_server_builds_strategies_only_from_its_registry():
    cfg = load_config({"overrides": "+strategy.x={_target_:pandas.read_pickle,filepath_or_buffer:/tmp/x.pkl}"})
    with pytest.raises(ConfigError, match="strategy.x is not a hyperparameter of FedAvgLoRA"):
        build_strategy(cfg)
    cfg = load_config({"overrides": "strategy._target_=pandas.read_pickle"})
    with pytest.raises(ConfigError, match="is not one of fedllm's strategies"):
        build_strategy(cfg)
    cfg = load_config({"overrides": "strategy=fedprox strategy.mu=[1,2]"})
    with pytest.raises(ConfigError, match=r"strategy.mu must be a number, a boolean or a string"):
        build_strategy(cfg)


def test_the_client_app_writes_its_files_private_to_the_node_owner(tmp_path):
    old = os.umask(0o022)
    try:
        server_sees({"overrides": "~seed"})
        (tmp_path / "cache-file").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "cache-file").stat().st_mode & 0o077 == 0


def test_a_run_may_set_the_codec_and_the_privacy_settings_on_a_node():
    policy = NodePolicy.from_node_config({"partition-id": 0}, simulation=False)
    policy.check_run_config({"overrides": "comm.codec=fp16 comm.budget_mb=100 privacy.dp=true privacy.secagg=true"})
    with pytest.raises(PolicyError, match="commx.codec is not a key a run may set"):
        policy.check_run_config({"overrides": "commx.codec=fp16"})


def test_a_run_may_ask_nodes_for_differential_privacy():
    NodePolicy().check_run_config({"overrides": "privacy.dp=true privacy.clip_norm=0.5 baseline=none"})


def test_a_run_cannot_write_canaries_into_a_real_nodes_data_unless_the_node_trusts_it():
    """privacy.canaries changes the node's training rows: an audit for simulations, or for a node owner who says so."""
    run_config = {"overrides": "privacy.canaries.count=2 privacy.canaries.digits=3"}
    deployment = NodePolicy.from_node_config(NODE, simulation=False)
    with pytest.raises(PolicyError, match="privacy.canaries.count=2 .* trust-run-config=true"):
        round_config(run_config, message(), deployment)
    for policy in (
        NodePolicy.from_node_config(NODE, simulation=True),
        NodePolicy.from_node_config({**NODE, "trust-run-config": True}, simulation=False),
    ):
        assert round_config(run_config, message(), policy).privacy.canaries.count == 2
    assert round_config({"overrides": "privacy.canaries.count=0"}, message(), deployment).privacy.canaries.count == 0

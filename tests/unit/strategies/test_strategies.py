"""Every FL strategy: hyperparameter validation, YAML defaults, state round trip, Flower plumbing."""

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedllm_app.config import ConfigError, conf_dir, load_config
from fedllm_app.server.run import build_strategy
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, WEIGHT_KEY
from strategies.fedavgm import FedAvgMParams
from strategies.fedopt import FedOptParams
from strategies.fedprox import PROXIMAL_MU_KEY, FedProxParams
from strategies.records import from_record, to_record
from strategies.registry import StrategyConfigError, build
from strategies.scaffold import C_DELTA_KEY, C_SERVER_KEY, ScaffoldParams
from tests.fakes import FakeGrid

ALGORITHMS = ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local", "central"]


def reply(arrays, n, extra=None):
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(arrays),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: n, WEIGHT_KEY: n, "train_loss": 1.0}),
        }
    )
    for k, v in (extra or {}).items():
        content[k] = to_record(v)
    return Message(content, dst_node_id=1, message_type="train")


def strategy(name, extra=""):
    return build_strategy(load_config({"overrides": f"strategy={name} num_clients=2 sample_clients=2 {extra}"}))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_has_a_config_and_builds(name):
    assert type(strategy(name)).__module__ == f"strategies.{name}"


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if n not in ("fedavg", "local", "central")])
def test_yaml_defaults_equal_the_dataclass_defaults(name):
    yaml = OmegaConf.load(conf_dir() / "strategy" / f"{name}.yaml")
    params = strategy(name).params
    defaults = {f.name: f.default for f in dataclasses.fields(params)}
    assert {k: yaml[k] for k in defaults} == pytest.approx(defaults)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("strategy=fedadam strategy.beta_1=1.5", r"strategy=fedadam: strategy.beta_1=1.5 must be in \(0.0, 1.0\)"),
        ("strategy=fedyogi strategy.beta_2=0", r"strategy.beta_2=0 must be in"),
        ("strategy=fedadagrad strategy.tau=0", r"strategy.tau=0 must be > 0"),
        ("strategy=fedprox strategy.mu=-0.1", r"strategy.mu=-0.1 must be >= 0"),
        ("strategy=fedavgm strategy.momentum=1.0", r"strategy.momentum=1.0 must be in"),
        ("strategy=scaffold strategy.server_lr=0", r"strategy.server_lr=0 must be > 0"),
    ],
)
def test_bad_hyperparameters_fail_at_start_with_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_strategy(load_config({"overrides": override}))


def test_fedadam_applies_its_step_to_the_weighted_mean_delta():
    s = strategy("fedadam", "strategy.eta=0.5 strategy.tau=0.1")
    glob = {"w": np.zeros(1, dtype=np.float32)}
    list(s.configure_train(1, to_record(glob), ConfigRecord(), FakeGrid(2)))
    new, _ = s.aggregate_train(
        1, [reply({"w": np.array([0.1], np.float32)}, 10), reply({"w": np.array([0.4], np.float32)}, 30)]
    )
    m = 0.1 * 0.325  # (1 - beta_1) x the weighted mean delta; the first moment starts at zero
    v = 0.99 * 0.01 + 0.01 * 0.325**2  # the squared delta (Reddi et al.), not m**2
    np.testing.assert_allclose(from_record(new)["w"], [0.5 * m / (np.sqrt(v) + 0.1)], rtol=1e-5)


@pytest.mark.parametrize(("form", "m1"), [("zero", 0.1 * 0.5), ("delta", 0.5)])
def test_fedavgm_first_moment_forms(form, m1):
    """OpenFedLLM's start (the first delta) counts round 1's delta 1/(1 - momentum) = 10 times in total."""
    s = strategy("fedavgm", f"strategy.first_moment={form}")
    x = {"w": np.zeros(1, dtype=np.float32)}
    total = 0.0
    for rnd in range(1, 200):
        list(s.configure_train(rnd, to_record(x), ConfigRecord(), FakeGrid(2)))
        update = np.array([0.5 if rnd == 1 else 0.0], np.float32)
        new, _ = s.aggregate_train(rnd, [reply({"w": x["w"] + update}, 1)])
        if rnd == 1:
            assert from_record(new)["w"][0] == pytest.approx(m1)
        x = from_record(new)
    total = float(x["w"][0])
    assert total == pytest.approx(0.5 if form == "zero" else 5.0, rel=1e-3)


def test_unknown_first_moment_form_fails_at_start():
    with pytest.raises(ConfigError, match=r"strategy.first_moment='ema' must be one of zero, delta"):
        build_strategy(load_config({"overrides": "strategy=fedadam strategy.first_moment=ema"}))


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi", "fedadam", "scaffold"])
def test_state_round_trip_gives_the_same_next_round(name):
    glob = {"w": np.array([0.5, -0.5], np.float32)}
    extra = {C_DELTA_KEY: {"w": np.array([0.1, 0.2], np.float32)}} if name == "scaffold" else None

    def one_round(s, x, value):
        list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid(2)))
        out, _ = s.aggregate_train(
            1, [reply({"w": x["w"] + value}, 5, extra), reply({"w": x["w"] - 2 * value}, 5, extra)]
        )
        return from_record(out)

    a = strategy(name)
    x1 = one_round(a, glob, 0.3)
    b = strategy(name)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(one_round(a, x1, 0.1)["w"], one_round(b, x1, 0.1)["w"])


def test_fedprox_sends_mu_and_scaffold_sends_c():
    msgs = list(
        strategy("fedprox", "strategy.mu=0.05").configure_train(
            1, to_record({"w": np.zeros(2)}), ConfigRecord(), FakeGrid(2)
        )
    )
    assert msgs[0].content[CONFIG_KEY][PROXIMAL_MU_KEY] == pytest.approx(0.05)
    msgs = list(strategy("scaffold").configure_train(1, to_record({"w": np.ones(2)}), ConfigRecord(), FakeGrid(2)))
    np.testing.assert_array_equal(from_record(msgs[0].content[C_SERVER_KEY])["w"], [0.0, 0.0])


def test_scaffold_updates_c_and_strips_the_extra_arrays():
    s = strategy("scaffold")  # N = 2
    x = {"w": np.zeros(1, np.float32)}
    list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid(2)))
    replies = [reply({"w": np.array([1.0], np.float32)}, 5, {C_DELTA_KEY: {"w": np.array([0.2], np.float32)}})]
    new, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(from_record(new)["w"], [1.0])
    np.testing.assert_allclose(s.c["w"], [0.5 * 0.2])  # |S|/N = 1/2
    assert C_DELTA_KEY not in replies[0].content


def test_every_strategy_describes_itself_and_fedavg_has_no_state():
    assert "mu': 0.01" in strategy("fedprox").describe()
    assert "2/2 clients" in strategy("fedavg").describe()
    s = strategy("fedavg")
    assert s.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        s.load_state_dict({"m": {}})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (lambda: FedOptParams(eta=0.0), "strategy.eta=0.0 must be > 0.0; e.g. strategy.eta=0.001"),
        (lambda: FedOptParams(beta_1=1.0), "strategy.beta_1=1.0 must be in (0.0, 1.0); e.g. strategy.beta_1=0.9"),
        (lambda: FedOptParams(beta_2=1.0), "strategy.beta_2=1.0 must be in (0.0, 1.0); e.g. strategy.beta_2=0.99"),
        (lambda: FedOptParams(tau=-1.0), "strategy.tau=-1.0 must be > 0.0; e.g. strategy.tau=0.001"),
        (
            lambda: FedOptParams(second_moment="m2"),
            "strategy.second_moment='m2' must be one of delta, momentum; e.g. strategy.second_moment=delta",
        ),
        (lambda: FedAvgMParams(server_lr=0.0), "strategy.server_lr=0.0 must be > 0.0; e.g. strategy.server_lr=1.0"),
        (
            lambda: FedAvgMParams(momentum=0.0),
            "strategy.momentum=0.0 must be in (0.0, 1.0); e.g. strategy.momentum=0.9",
        ),
        (lambda: ScaffoldParams(server_lr=-2.0), "strategy.server_lr=-2.0 must be > 0.0; e.g. strategy.server_lr=1.0"),
        (lambda: FedProxParams(mu=-1e-3), "strategy.mu=-0.001 must be >= 0; e.g. strategy.mu=0.01"),
    ],
)
def test_each_out_of_range_hyperparameter_is_named_whole_with_its_bounds_and_an_example(params, message):
    with pytest.raises(ValueError) as err:
        params()
    assert str(err.value) == message


@pytest.mark.parametrize(
    "params",
    [
        lambda: FedOptParams(beta_1=0.999, beta_2=0.999999, eta=1e9, tau=1e-9),
        lambda: FedAvgMParams(server_lr=1e-9, momentum=0.999),
        lambda: ScaffoldParams(server_lr=1e-9),
        lambda: FedProxParams(mu=0.0),  # mu 0 is FedAvg: allowed
    ],
)
def test_hyperparameters_inside_their_bounds_are_accepted(params):
    params()


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi", "fedadam", "scaffold"])
def test_a_round_with_no_valid_reply_keeps_the_global_and_the_servers_state(name):
    s = strategy(name)
    glob = {"w": np.array([0.5, -0.5], np.float32)}
    list(s.configure_train(1, to_record(glob), ConfigRecord(), FakeGrid(2)))
    before = s.state_dict()
    new, _ = s.aggregate_train(1, [])  # every reply failed or was rejected by the round loop
    assert new is None
    after = s.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        if before[key] is None:
            assert after[key] is None
        else:
            for n in before[key]:
                np.testing.assert_array_equal(after[key][n], before[key][n])


@pytest.mark.parametrize("name", ["fedavgm", "fedyogi", "fedadam"])
def test_the_first_moment_after_round_one_has_the_globals_shapes_and_float_values(name):
    s = strategy(name)
    glob = {"w": np.zeros((2, 3), np.float32)}
    list(s.configure_train(1, to_record(glob), ConfigRecord(), FakeGrid(2)))
    s.aggregate_train(1, [reply({"w": np.full((2, 3), 0.5, np.float32)}, 5)])
    m = s.state_dict()["m"]["w"]
    assert m.shape == (2, 3) and m.dtype.kind == "f"
    np.testing.assert_allclose(m, 0.1 * 0.5)  # (1 - beta) x the delta, from zero (beta 0.9 for all three)


@pytest.mark.parametrize(
    ("name", "extra", "line"),
    [
        ("fedavg", "", "FedAvgLoRA {} sampling 2/2 clients per round"),
        ("fedprox", "strategy.mu=0.05", "FedProx {'mu': 0.05} sampling 2/2 clients per round"),
        (
            "fedavg",
            "strategy.aggregator=median",
            "FedAvgLoRA {'aggregator': 'median', 'num_malicious': 0, 'trim_fraction': 0.2} sampling 2/2 clients "
            "per round",
        ),
    ],
)
def test_the_run_logs_strategy_line_names_the_class_its_hyperparameters_and_a_robust_rule(name, extra, line):
    assert strategy(name, extra).describe() == line


RUN_WIDE = {"num_clients": 4, "sample_clients": 2, "num_rounds": 3, "lr_max": 1e-2, "lr_min": 1e-3}


def test_a_target_outside_the_registry_is_refused_with_the_whole_list():
    with pytest.raises(StrategyConfigError) as err:
        build({"_target_": "pandas.read_pickle"}, **RUN_WIDE)
    assert str(err.value) == (
        "strategy._target_='pandas.read_pickle' is not one of fedllm's strategies: ['strategies.central.Central', "
        "'strategies.fedadagrad.FedAdagrad', 'strategies.fedadam.FedAdam', 'strategies.fedavg.FedAvgLoRA', "
        "'strategies.fedavgm.FedAvgM', 'strategies.fedprox.FedProx', 'strategies.fedyogi.FedYogi', "
        "'strategies.local.LocalOnly', 'strategies.scaffold.Scaffold']"
    )


def test_an_unknown_hyperparameter_is_refused_naming_those_the_class_takes_or_none():
    with pytest.raises(StrategyConfigError) as err:
        build({"_target_": "strategies.fedavg.FedAvgLoRA", "bogus": 1}, **RUN_WIDE)
    assert str(err.value) == (
        "strategy.bogus is not a hyperparameter of FedAvgLoRA; it takes ['aggregator', 'num_malicious', "
        "'query_timeout', 'seed', 'trim_fraction']"
    )
    every = {**RUN_WIDE, "aggregator": "mean", "num_malicious": 0, "trim_fraction": 0.2, "seed": 0}
    with pytest.raises(StrategyConfigError) as err:
        build({"_target_": "strategies.local.LocalOnly", "bogus": 1}, **every, query_timeout=1.0)
    assert str(err.value) == "strategy.bogus is not a hyperparameter of LocalOnly; it takes none"


def test_a_hyperparameter_that_is_no_scalar_is_refused_and_a_null_one_passes_through():
    with pytest.raises(StrategyConfigError) as err:
        build({"_target_": "strategies.fedavg.FedAvgLoRA", "aggregator": {"_target_": "os.system"}}, **RUN_WIDE)
    assert (
        str(err.value) == "strategy.aggregator must be a number, a boolean or a string, got {'_target_': 'os.system'}"
    )
    assert build({"_target_": "strategies.fedavg.FedAvgLoRA", "seed": None}, **RUN_WIDE).seed is None


def test_an_adaptive_strategy_that_sent_no_global_yet_returns_the_plain_mean():
    s = strategy("fedadam")  # no configure_train: the global it would step from is unknown
    new, _ = s.aggregate_train(1, [reply({"w": np.array([1.0, 3.0], np.float32)}, 1)])
    np.testing.assert_array_equal(from_record(new)["w"], [1.0, 3.0])


def test_a_resumed_scaffold_that_sent_no_global_this_run_returns_the_plain_mean_and_keeps_its_c():
    s = strategy("scaffold")
    s.load_state_dict({"c": {"w": np.array([0.3], np.float32)}})
    s.connected_partitions(FakeGrid(2))  # the partitions are known; no global was sent yet
    replies = [reply({"w": np.array([1.0], np.float32)}, 5, {C_DELTA_KEY: {"w": np.array([0.2], np.float32)}})]
    new, _ = s.aggregate_train(1, replies)
    np.testing.assert_array_equal(from_record(new)["w"], [1.0])
    np.testing.assert_array_equal(s.c["w"], np.array([0.3], np.float32))

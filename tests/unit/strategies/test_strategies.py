"""Every FL strategy: hyperparameter validation, YAML defaults, state round trip, Flower plumbing."""

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedllm_app.config import ConfigError, conf_dir, load_config
from fedllm_app.server.run import build_strategy
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, WEIGHT_KEY
from strategies.fedprox import PROXIMAL_MU_KEY
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY, C_SERVER_KEY
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

"""DP-FedAvg around every strategy: Poisson sampling, server-side clipping, the noised mean before the server step."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.run import build_strategy
from strategies.accounting import epsilon
from strategies.dp import CLIP_NORM_KEY, WITHIN_CLIP_KEY, Accounting, DPStrategy, with_dp, within_clip
from strategies.fedavg import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DATA_SIZE_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    WEIGHT_KEY,
    FedAvgLoRA,
)
from strategies.local import LocalOnly
from strategies.privacy import DPParams, clip_update
from strategies.records import from_record, to_record
from strategies.sampling import secret_poisson_partitions
from strategies.scaffold import C_DELTA_KEY, Scaffold

SEVEN = ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam"]
START = {"w": np.array([0.5, -0.5, 0.0], dtype=np.float32)}
DP = "privacy.dp=true baseline=none privacy.clip_norm=1.0 privacy.noise_multiplier=0.5"


class Grid:
    """Nodes 1..n; node k holds partition k - 1."""

    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def send_and_receive(self, messages, *, timeout=None):
        return [
            Message(RecordDict({METRICS_KEY: MetricRecord({"partition-id": m.metadata.dst_node_id - 1})}), reply_to=m)
            for m in messages
        ]


def build(name, extra="", clients=4, sample=4):
    cfg = load_config({"overrides": f"strategy={name} num_clients={clients} sample_clients={sample} {DP} {extra}"})
    s = build_strategy(cfg)
    s.rng = np.random.default_rng(0)
    return s


def update_of(node):
    """Node k's adapter delta: small for nodes 1-3, norm 3 sqrt(3) (above C = 1) for node 4."""
    return np.full(3, 3.0 if node == 4 else 0.1 * node)


def replies_to(messages, scaffold=False):
    out = []
    for m in messages:
        node = m.metadata.dst_node_id
        d = update_of(node)
        within = float(np.linalg.norm(d) <= 1.0)
        metrics = {NUM_EXAMPLES_KEY: 5, DATA_SIZE_KEY: 5, WEIGHT_KEY: 5.0, "train_loss": 1.0, WITHIN_CLIP_KEY: within}
        content = RecordDict(
            {ARRAYS_KEY: to_record({"w": (START["w"] + d).astype(np.float32)}), METRICS_KEY: MetricRecord(metrics)}
        )
        if scaffold:
            content[C_DELTA_KEY] = to_record({"w": np.full(3, 0.2, dtype=np.float32)})
        out.append(Message(content, reply_to=m))
    return out


def expected_noised_mean(scaffold: bool):
    """Clip each node's update (with its control delta) to C = 1, sum, divide by q N = 4, add seeded noise."""
    parts = ["arrays", "c-delta"] if scaffold else ["arrays"]
    total = {p: np.zeros(3) for p in parts}
    own = {}
    for node in (1, 2, 3, 4):
        joint = {"arrays": update_of(node).astype(np.float32).astype(np.float64) + 0.0}
        if scaffold:
            joint["c-delta"] = np.full(3, 0.2, dtype=np.float32).astype(np.float64)
        clipped, _ = clip_update(joint, 1.0)
        own[node - 1] = clipped
        for p in parts:
            total[p] += clipped[p]
    rng, std = np.random.default_rng(0), 0.5 * 1.0 / 4
    return {p: {"w": total[p] / 4 + rng.normal(0.0, std, size=3)} for p in parts}, own


@pytest.mark.parametrize("name", SEVEN)
def test_every_strategy_takes_its_server_step_on_the_noised_mean(name):
    scaffold = name == "scaffold"
    s = build(name)
    messages = list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    assert [m.content[CONFIG_KEY][CLIP_NORM_KEY] for m in messages] == [1.0] * 4
    new, metrics = s.aggregate_train(1, replies_to(messages, scaffold))

    noised, own = expected_noised_mean(scaffold)
    plain = build_strategy(load_config({"overrides": f"strategy={name} num_clients=4 sample_clients=4"}))
    list(plain.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    per_partition = {pid: {p: {"w": v} for p, v in parts.items()} for pid, parts in own.items()}
    want = plain.step_from_mean({"w": START["w"]}, noised, 4.0, per_partition)
    np.testing.assert_allclose(from_record(new)["w"], want["w"], rtol=1e-5, atol=1e-6)
    assert s.dp_metrics["dp_server_clipped"] == 1.0  # node 4 sent an update above C
    assert s.dp_metrics["dp_clip_fraction"] == pytest.approx(0.25)
    assert s.dp_metrics["dp_noise_std"] == pytest.approx(0.125)
    assert metrics["train_loss"] == pytest.approx(1.0)
    if scaffold:
        np.testing.assert_allclose(s.c["w"], noised["c-delta"]["w"], rtol=1e-5)  # c += (4 / 4) noised mean
        np.testing.assert_allclose(s.c_i[3]["w"], own[3]["c-delta"], rtol=1e-5)  # each c_i: its own clipped delta
        assert s.c_i[3]["w"].dtype == np.float32


def test_fedavg_under_dp_is_the_global_plus_the_noised_fixed_weight_mean():
    s = build("fedavg")
    messages = list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    new, _ = s.aggregate_train(1, replies_to(messages))
    noised, _ = expected_noised_mean(False)
    np.testing.assert_allclose(from_record(new)["w"], START["w"] + noised["arrays"]["w"], rtol=1e-5, atol=1e-6)


def test_a_round_with_no_reply_still_releases_noise():
    s = build("fedavg")
    list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    new, _ = s.aggregate_train(1, [])
    noise = np.random.default_rng(0).normal(0.0, 0.125, size=3)
    np.testing.assert_allclose(from_record(new)["w"], START["w"] + noise, rtol=1e-5, atol=1e-6)


def test_clients_are_poisson_sampled_from_the_strategys_secret_key_and_the_round():
    s = build("fedavg", clients=20, sample=5)  # q = 0.25
    counts = []
    for rnd in (1, 2, 3, 4, 5, 6):
        messages = s.configure_train(rnd, to_record(START), ConfigRecord(), Grid(20))
        drawn = sorted(m.metadata.dst_node_id - 1 for m in messages)
        assert drawn == secret_poisson_partitions(s.sampling_key, rnd, 20, 0.25, range(20))
        counts.append(len(drawn))
    assert len(set(counts)) > 1  # the number of clients varies from round to round


def test_poisson_sampling_draws_each_partition_with_probability_q():
    key, hits = bytes(range(32)), np.zeros(50)
    for rnd in range(1, 401):
        for p in secret_poisson_partitions(key, rnd, 50, 0.1, range(50)):
            hits[p] += 1
    assert hits.mean() / 400 == pytest.approx(0.1, abs=0.01)
    assert secret_poisson_partitions(key, 7, 50, 0.1, range(50)) == secret_poisson_partitions(
        key, 7, 50, 0.1, range(50)
    )
    assert 0 not in secret_poisson_partitions(key, 7, 50, 1.0, range(1, 50))  # an unavailable partition sits out


def test_two_dp_runs_with_the_same_public_seed_draw_different_clients():
    a, b = build("fedavg", clients=40, sample=20), build("fedavg", clients=40, sample=20)  # same seed, q = 1/2
    assert a.seed == b.seed
    assert [a.round_partitions(r) for r in (1, 2, 3)] != [b.round_partitions(r) for r in (1, 2, 3)]


def test_a_dp_strategy_restored_from_the_state_dict_draws_the_same_clients(tmp_path):
    from fedllm_app.server.resume import load_state, save_state

    a, b = build("fedavg", clients=40, sample=20), build("fedavg", clients=40, sample=20)
    state = a.state_dict()
    assert state["dp-sampling-key"]["value"].dtype == np.uint8 and state["dp-sampling-key"]["value"].size == 32
    kw = {"totals": {}, "summary": {}, "last_eval": {}, "metrics": []}
    save_state(tmp_path, phase="train", server_round=1, arrays=to_record(START), strategy_state=state, **kw)
    b.load_state_dict(load_state(tmp_path).strategy)  # through resume_state.npz, as a resumed run
    assert [a.round_partitions(r) for r in range(1, 6)] == [b.round_partitions(r) for r in range(1, 6)]


def test_a_sampling_key_too_short_to_be_secret_is_refused():
    with pytest.raises(ValueError, match="sampling key of 4 bytes is too short"):
        secret_poisson_partitions(b"abcd", 1, 10, 0.5, range(10))


def test_adaptive_clipping_lowers_the_clip_norm_when_every_update_is_within_it():
    s = build("fedavg", "privacy.adaptive_clip=true")
    messages = [m for m in s.configure_train(1, to_record(START), ConfigRecord(), Grid(4))]
    small = [r for r in replies_to(messages) if r.metadata.src_node_id != 4]
    s.aggregate_train(1, small)
    assert s.clip_norm < 1.0
    assert s.train_config(2, ConfigRecord())[CLIP_NORM_KEY] == s.clip_norm
    s2 = build("fedavg", "privacy.adaptive_clip=true")
    s2.load_state_dict(s.state_dict())
    assert s2.clip_norm == s.clip_norm  # a resumed run keeps the adapted C


def test_adaptive_clipping_adapts_to_the_centred_noised_count_of_updates_within_the_clip_norm():
    # 4 expected clients, only nodes 1 and 2 reply (both within C = 1): the count's noise is the 4th draw of the
    # seeded generator (3 go to the update), std max(4 / 20, z = 0.5) = 0.5; the released fraction is
    # (sum (b - 1/2) + noise) / 4 + 1/2 = (1 + noise) / 4 + 1/2, not the uncentred (2 + noise) / 4
    s = build("fedavg", "privacy.adaptive_clip=true")
    messages = list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    s.aggregate_train(1, [r for r in replies_to(messages) if r.metadata.src_node_id in (1, 2)])
    noise = 0.5 * np.random.default_rng(0).standard_normal(4)[3]
    fraction = (1.0 + noise) / 4 + 0.5
    assert s.clip_norm == pytest.approx(np.exp(-0.2 * (fraction - 0.5)))


def test_a_round_that_releases_nothing_logs_no_dp_metrics_of_the_previous_round():
    from fedllm_app.server.rounds import privacy_record

    s = build("fedavg")
    s.aggregate_train(1, replies_to(list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))))
    assert privacy_record(s, 1)["dp_clip_norm"] == 1.0
    list(s.configure_train(2, to_record(START), ConfigRecord(), Grid(4)))  # round 2: no release (e.g. secagg failed)
    record = privacy_record(s, 2)
    assert "dp_clip_norm" not in record and "dp_noise_std" not in record and record["epsilon"] > 0


def test_target_epsilon_refuses_the_round_that_would_exceed_it():
    s = build("fedavg", "privacy.noise_multiplier=1.0 privacy.target_epsilon=3.0", clients=100, sample=10)
    rounds = [r for r in range(1, 200) if s.may_run(r)]
    last = rounds[-1]
    assert rounds == list(range(1, last + 1))
    assert s.privacy_spent(last) <= 3.0 < s.privacy_spent(last + 1)


def test_a_null_noise_multiplier_is_derived_from_the_target_epsilon():
    s = build("fedavg", "num_rounds=20 privacy.noise_multiplier=null privacy.target_epsilon=4.0", 100, 10)
    assert s.privacy_spent(20) <= 4.0
    assert s.may_run(20)


def test_strategies_that_average_nothing_cannot_be_wrapped():
    with pytest.raises(ValueError, match="privacy.dp=true with LocalOnly"):
        with_dp(LocalOnly)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("privacy.noise_multiplier=0", r"privacy.noise_multiplier=0 must be positive"),
        ("privacy.noise_multiplier=-1", r"privacy.noise_multiplier=-1 must be positive"),
        ("privacy.clip_norm=0", r"privacy.clip_norm=0 must be positive"),
        ("privacy.clip_norm=-2", r"privacy.clip_norm=-2 must be positive"),
        ("strategy=central", r"privacy.dp=true with strategy=central"),
        ("strategy=local", r"privacy.dp=true with strategy=local"),
        ("strategy.aggregator=median", r"strategy.aggregator=median.*set strategy.aggregator=mean"),
        ("lora_aggregation=hetlora model.lora.client_ranks=[4,8]", r"privacy.dp=true with lora_aggregation=hetlora"),
        ("baseline=local", r"privacy.dp=true with baseline=local.*set baseline=none"),
        ("privacy.noise_multiplier=null", r"privacy.noise_multiplier=null needs privacy.target_epsilon"),
        ("privacy.accountant=moments", r"privacy.accountant='moments' must be one of rdp, pld"),
        ("privacy.delta=0", r"privacy.delta=0 must be in \(0, 1\)"),
    ],
)
def test_a_dp_setting_that_cannot_hold_fails_before_training_naming_it(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": f"{DP} {override}"})


def test_a_target_epsilon_already_exceeded_by_round_1_fails_when_the_server_builds_the_strategy():
    cfg = load_config({"overrides": f"{DP} privacy.target_epsilon=0.01"})
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon=0.01 is already exceeded by round 1"):
        build_strategy(cfg)


def test_config_and_the_accountant_agree_on_the_accountants():
    from fedllm_app.config import DP_ACCOUNTANTS
    from strategies.accounting import ACCOUNTANTS

    assert DP_ACCOUNTANTS == ACCOUNTANTS


def dp_strategy(cls=FedAvgLoRA, server_lr=1.0, accounting=None, **dp_kw):
    """``cls`` under DP over 4 partitions, every one drawn (q = 1), C = 1, z = 0.5, seeded server noise."""
    params = DPParams(**{"clip_norm": 1.0, "noise_multiplier": 0.5, "sample_rate": 1.0, "num_clients": 4, **dp_kw})
    extra = {"server_lr": server_lr} if cls is Scaffold else {}
    kw = {"num_clients": 4, "sample_clients": 4, "num_rounds": 2, "lr_max": 1e-2, "lr_min": 1e-3, **extra}
    return with_dp(cls)(dp=params, accounting=accounting, rng=np.random.default_rng(0), **kw)


SUM = {"w": np.array([0.4, 0.8, -0.4])}  # the unmasked sum of the clients' clipped updates (secure aggregation)


def test_the_sum_path_releases_the_noised_fixed_weight_mean_of_the_unmasked_sum():
    s = dp_strategy()
    messages = list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    replies = [r for r in replies_to(messages) if r.metadata.src_node_id in (3, 4)]  # within C: node 3, not 4
    new = s.step_from_sum({ARRAYS_KEY: SUM}, replies)
    noise = np.random.default_rng(0).normal(0.0, 0.125, size=3)
    np.testing.assert_allclose(from_record(new)["w"], START["w"] + SUM["w"] / 4 + noise, rtol=1e-5, atol=1e-6)
    assert s.dp_metrics == {
        "dp_clip_norm": 1.0,
        "dp_noise_std": 0.125,
        "dp_clip_fraction": 0.5,
        "dp_server_clipped": 0.0,  # the server never sees one update to clip
    }


def test_the_sum_path_under_distributed_noise_adds_none_and_reports_the_shares_noise():
    s = dp_strategy(noise="distributed", noise_colluders=1)
    messages = list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    new = s.step_from_sum({ARRAYS_KEY: SUM}, replies_to(messages)[:2], threshold=3)
    np.testing.assert_allclose(from_record(new)["w"], START["w"] + SUM["w"] / 4, rtol=1e-6)
    share = 0.5 * 1.0 / np.sqrt(3 - 1)  # z C / sqrt(t - c)
    assert s.dp_metrics["dp_noise_std"] == pytest.approx(np.sqrt(2) * share / 4)
    assert s.dp_metrics["dp_noise_shares"] == 2.0
    with pytest.raises(RuntimeError, match="privacy.noise=distributed needs secure aggregation"):
        s.step_from_sum({ARRAYS_KEY: SUM}, replies_to(messages)[:2])  # no threshold: not a secure round


def test_the_sum_path_moves_scaffolds_x_by_its_server_lr_and_c_and_leaves_each_c_i_with_its_client():
    s = dp_strategy(Scaffold, server_lr=0.5)
    list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    c_sum = {"w": np.array([0.2, 0.2, 0.2])}
    new = s.step_from_sum({ARRAYS_KEY: SUM, C_DELTA_KEY: c_sum}, [])
    noise = np.random.default_rng(0).normal(0.0, 0.125, size=6)  # the adapter's, then the control delta's
    want = START["w"] + 0.5 * (SUM["w"] / 4 + noise[:3])  # x += lr (noised mean)
    np.testing.assert_allclose(from_record(new)["w"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.c["w"], c_sum["w"] / 4 + noise[3:], rtol=1e-5, atol=1e-6)  # c += (4 / 4) mean
    assert s.c["w"].dtype == np.float32
    assert s.c_i == {}


def test_the_sum_path_before_any_round_releases_nothing():
    assert dp_strategy().step_from_sum({ARRAYS_KEY: SUM}, []) is None


def test_the_run_log_names_every_dp_setting():
    tail = (
        "; DP-FedAvg clip_norm 1.0 noise_multiplier 0.5 Poisson rate 1 (expected 4 clients) adaptive_clip False "
        "accountant rdp delta 1e-05 target_epsilon None noise server"
    )
    assert dp_strategy().describe().endswith(tail)
    distributed = dp_strategy(noise="distributed", noise_colluders=1).describe()
    assert distributed.endswith("noise distributed (tolerating 1 colluding clients)")


def test_a_state_without_dp_entries_keeps_the_clip_norm_and_the_key_and_scaffolds_c_is_restored():
    s = dp_strategy()
    key = s.sampling_key
    s.load_state_dict({})
    assert s.clip_norm == 1.0 and s.sampling_key == key
    a, b = dp_strategy(Scaffold), dp_strategy(Scaffold)
    list(a.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    a.step_from_sum({ARRAYS_KEY: SUM, C_DELTA_KEY: {"w": np.ones(3)}}, [])
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.c["w"], a.c["w"])
    assert b.sampling_key == a.sampling_key


@pytest.mark.parametrize("delta", [0.0, -1e-5, 1.0, 1.5])
def test_a_delta_outside_the_open_unit_interval_is_refused_with_the_whole_message(delta):
    with pytest.raises(ValueError) as err:
        Accounting(delta=delta)
    assert str(err.value) == f"privacy.delta={delta} must be in (0, 1); e.g. 1e-5 (below 1 / the number of users)"


def test_an_unknown_accountant_is_refused_with_the_whole_message():
    with pytest.raises(ValueError) as err:
        Accounting(accountant="moments")
    assert str(err.value) == "privacy.accountant='moments' must be one of rdp, pld"


class Pooling(FedAvgLoRA):
    """Averages, but pools the data (as the central baseline)."""

    mode = "central"


class Unaveraged(FedAvgLoRA):
    """Federated, but keeps each client's adapter its own (as the local baseline)."""

    averages = False


class Lookalike:
    """Says it is a federated averaging strategy, but is no FedAvgLoRA."""

    mode, averages = "federated", True


@pytest.mark.parametrize("cls", [Pooling, Unaveraged, Lookalike])
def test_a_class_that_is_not_a_federated_averaging_strategy_cannot_be_wrapped_and_the_error_names_it(cls):
    with pytest.raises(ValueError) as err:
        with_dp(cls)
    assert str(err.value) == (
        f"privacy.dp=true with {cls.__name__}: DP-FedAvg noises the mean of the clients' updates, and this strategy "
        "averages none (local-only) or pools the data (central); choose a federated strategy (fedavg, fedprox, "
        "fedavgm, fedadagrad, fedadam, fedyogi, scaffold) or set privacy.dp=false"
    )


def test_the_wrapped_class_is_named_and_documented_after_the_strategy_and_runs_the_dp_round_first():
    cls = with_dp(Scaffold)
    assert cls.__name__ == "DPScaffold"
    assert cls.__doc__ == "Scaffold under DP-FedAvg."
    assert cls.__mro__[1:3] == (DPStrategy, Scaffold)


def test_plain_aggregation_under_distributed_noise_is_refused_naming_the_fix():
    s = dp_strategy(noise="distributed")
    messages = list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    fix = "privacy.noise=distributed needs secure aggregation: set privacy.secagg=true"
    with pytest.raises(RuntimeError) as err:
        s.aggregate_train(1, replies_to(messages))
    assert str(err.value) == fix
    with pytest.raises(RuntimeError) as err:
        s.step_from_sum({ARRAYS_KEY: SUM}, replies_to(messages))  # no threshold: not a secure round
    assert str(err.value) == fix


def replies_of(messages, updates):
    """Replies whose adapter is ``updates[node]`` (the global being zero), each within C by its own account."""
    metrics = {NUM_EXAMPLES_KEY: 5, DATA_SIZE_KEY: 5, WEIGHT_KEY: 5.0, WITHIN_CLIP_KEY: 1.0}
    return [
        Message(
            RecordDict(
                {
                    ARRAYS_KEY: to_record({"w": np.array([updates[m.metadata.dst_node_id]], dtype=np.float32)}),
                    METRICS_KEY: MetricRecord(metrics),
                }
            ),
            reply_to=m,
        )
        for m in messages
    ]


def test_only_updates_beyond_the_float32_tolerance_above_c_count_as_server_clipped():
    c = 1 / 1.001  # so that the tolerance bound C (1 + 1e-3) is exactly 1.0
    s = dp_strategy(clip_norm=c)
    messages = list(s.configure_train(1, to_record({"w": np.zeros(1, np.float32)}), ConfigRecord(), Grid(4)))
    # node 1 exactly at the bound, node 2 above C but within the tolerance, node 3 within C, node 4 beyond the bound
    s.aggregate_train(1, replies_of(messages, {1: 1.0, 2: 0.9995, 3: 0.5, 4: 1.01}))
    assert s.dp_metrics["dp_server_clipped"] == 1.0


def test_a_round_with_no_reply_reports_no_clipped_share_and_empty_train_metrics():
    s = dp_strategy()
    list(s.configure_train(1, to_record(START), ConfigRecord(), Grid(4)))
    _, metrics = s.aggregate_train(1, [])
    assert s.dp_metrics == {
        "dp_clip_norm": 1.0,
        "dp_noise_std": 0.125,
        "dp_clip_fraction": 0.0,
        "dp_server_clipped": 0.0,
    }
    assert metrics == MetricRecord()


def reply_with(metrics):
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), dst_node_id=1, message_type="train")


@pytest.mark.parametrize(
    ("value", "bit"), [(1.0, 1.0), (0.0, 0.0), (0.5, 1.0), (0.49, 0.0), (0.7, 1.0), (3.0, 1.0), (None, 0.0)]
)
def test_a_replys_within_clip_report_counts_as_its_nearer_bit_and_an_absent_one_as_0(value, bit):
    assert within_clip(reply_with({} if value is None else {WITHIN_CLIP_KEY: value})) == bit


def test_a_dp_strategy_reports_epsilon_zero_and_no_dp_metrics_before_its_first_round():
    from fedllm_app.server.rounds import privacy_record

    assert privacy_record(dp_strategy(), 0) == {"epsilon": 0.0, "delta": 1e-5}


def test_the_privacy_spent_is_counted_with_the_configured_accountant():
    s = dp_strategy(accounting=Accounting(accountant="pld"), noise_multiplier=4.0)
    assert s.privacy_spent(1) == epsilon(1.0, 4.0, 1, 1e-5, "pld")
    assert s.privacy_spent(1) < epsilon(1.0, 4.0, 1, 1e-5, "rdp") - 0.05  # PLD is tighter: not RDP's number


def test_a_round_that_spends_exactly_the_target_epsilon_may_run_and_the_next_may_not():
    s = dp_strategy(accounting=Accounting(target_epsilon=epsilon(1.0, 0.5, 3, 1e-5)))
    assert [s.may_run(r) for r in (1, 2, 3, 4)] == [True, True, True, False]


def test_the_poisson_sample_leaves_out_the_partitions_not_available():
    s = dp_strategy()  # q = 1: every available partition is drawn
    assert s.round_partitions(1) == [0, 1, 2, 3]
    assert s.round_partitions(1, available=[1, 3]) == [1, 3]


def test_a_sampling_key_saved_as_wider_integers_is_restored_byte_by_byte():
    s = dp_strategy()
    s.load_state_dict({"dp-sampling-key": {"value": np.arange(32, dtype=np.int64)}})
    assert s.sampling_key == bytes(range(32))

"""DP-FedAvg's math on hand-computed arrays: joint clipping, the fixed-weight mean, noise, adaptive clipping."""

import math

import numpy as np
import pytest

from strategies.dp import clip_reply_parts, join_update, split_update
from strategies.privacy import (
    DPParams,
    adapt_clip_norm,
    add_gaussian_noise,
    clip_update,
    combined_noise_multiplier,
    fixed_weight_mean,
    l2_norm,
    noise_share_range,
    noise_share_std,
    noise_std,
    noised_fraction_within,
    update_noise_multiplier,
)


def test_clipping_scales_all_arrays_together_to_the_clip_norm():
    update = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]])}  # joint norm 5
    clipped, scaled = clip_update(update, 1.0)
    assert scaled
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [[0.0], [0.8]])
    assert l2_norm(clipped) == pytest.approx(1.0)


def test_an_update_within_the_clip_norm_is_unchanged_and_not_counted_as_clipped():
    update = {"a": np.array([0.3, 0.4], dtype=np.float32)}
    clipped, scaled = clip_update(update, 1.0)
    assert not scaled
    np.testing.assert_array_equal(clipped["a"], update["a"])
    assert clipped["a"].dtype == np.float32


def test_scaffold_adapter_and_control_deltas_are_clipped_as_one_vector():
    global_ = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    trained = {"w": np.array([4.0, 1.0], dtype=np.float32)}  # adapter delta (3, 0)
    extras = {"c-delta": {"w": np.array([0.0, 4.0])}}  # control delta (0, 4): joint norm 5
    new, clipped_extras, scaled = clip_reply_parts(global_, trained, extras, 2.5)  # scale 0.5
    assert scaled
    np.testing.assert_allclose(new["w"], [2.5, 1.0])
    np.testing.assert_allclose(clipped_extras["c-delta"]["w"], [0.0, 2.0])


def test_a_clipped_reply_keeps_the_clients_dtype_and_its_control_delta_is_float32():
    global_ = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    trained = {"w": np.array([4.0, 1.0], dtype=np.float32)}
    new, extras, _ = clip_reply_parts(global_, trained, {"c-delta": {"w": np.array([0.0, 4.0])}}, 2.5)
    assert new["w"].dtype == np.float32 and extras["c-delta"]["w"].dtype == np.float32


def test_join_and_split_update_are_inverse():
    parts = {"arrays": {"x.y": np.ones(2)}, "c-delta": {"x.y": np.zeros(2)}}
    back = split_update(join_update(parts))
    assert set(back) == set(parts) and all(set(back[p]) == {"x.y"} for p in parts)


def test_the_mean_divides_by_the_expected_not_the_realised_number_of_clients():
    updates = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    np.testing.assert_allclose(fixed_weight_mean(updates, 4.0, {"w": np.zeros(1)})["w"], [1.0])
    np.testing.assert_array_equal(fixed_weight_mean([], 4.0, {"w": np.zeros(2)})["w"], [0.0, 0.0])


def test_noise_std_is_z_times_c_over_the_expected_clients_and_the_noise_has_that_std():
    std = noise_std(1.5, 2.0, 10.0)
    assert std == pytest.approx(0.3)
    noised = add_gaussian_noise({"w": np.zeros(200_000)}, std, np.random.default_rng(0))
    assert np.std(noised["w"]) == pytest.approx(0.3, rel=0.01)
    assert abs(np.mean(noised["w"])) < 0.003


def test_adaptive_clipping_splits_the_noise_so_the_round_stays_a_gaussian_mechanism_with_z():
    z_delta = update_noise_multiplier(1.0, 5.0)
    assert z_delta == pytest.approx((1 - 1 / 100) ** -0.5)
    assert (z_delta**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"needs noise_multiplier < 2 \* count_std = 1$"):
        update_noise_multiplier(1.0, 0.5)


def test_the_update_and_the_centred_count_together_are_a_gaussian_mechanism_with_z():
    for z, count_std in [(1.0, 5.0), (0.5, 0.5), (2.0, 1.5), (1.0, 1.0)]:
        z_delta = update_noise_multiplier(z, count_std)
        assert z_delta > z
        assert combined_noise_multiplier(z_delta, count_std) == pytest.approx(z)


def test_the_released_fraction_within_clip_is_the_centred_noised_count_over_the_expected_clients():
    # 2 of 3 replies within C, 4 expected, noise 0.3: ((2 - 3 / 2) + 0.3) / 4 + 1 / 2 = 0.7
    assert noised_fraction_within(2, 3, 4.0, 0.3) == pytest.approx(0.7)
    assert noised_fraction_within(4, 4, 4.0, 0.0) == pytest.approx(1.0)
    assert noised_fraction_within(0, 0, 4.0, 0.0) == pytest.approx(0.5)  # no reply: no evidence either way
    assert noised_fraction_within(1, 1, 1.0, 0.0) == pytest.approx(1.0)  # one expected client
    with pytest.raises(ValueError, match="^expected clients 0 must be positive$"):
        noised_fraction_within(0, 0, 0, 0.0)


def test_one_user_moves_the_noised_count_by_half_a_count_whatever_their_bit():
    # the sensitivity the noise split assumes: adding a user with b = 1 or b = 0 moves the sum by +-1/2
    base = noised_fraction_within(2, 3, 4.0, 0.0) * 4.0
    assert noised_fraction_within(3, 4, 4.0, 0.0) * 4.0 - base == pytest.approx(0.5)
    assert noised_fraction_within(2, 4, 4.0, 0.0) * 4.0 - base == pytest.approx(-0.5)


def test_the_clip_norm_moves_geometrically_towards_the_target_quantile():
    # fraction 0.75 > 0.5, so C shrinks by exp(-0.2 * 0.25)
    assert adapt_clip_norm(1.0, 0.75, 0.5, 0.2) == pytest.approx(math.exp(-0.05))
    assert adapt_clip_norm(1.0, 0.25, 0.5, 0.2) == pytest.approx(math.exp(0.05))
    assert adapt_clip_norm(1.0, 0.5, 0.5, 0.2) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"clip_norm": 0.0}, r"privacy.clip_norm=0.0 must be positive"),
        ({"noise_multiplier": -1.0}, r"privacy.noise_multiplier=-1.0 must be positive"),
        ({"target_quantile": 1.0}, r"privacy.target_quantile=1.0"),
        ({"adaptive_clip": True, "count_std": 1.0, "noise_multiplier": 5.0}, r"needs noise_multiplier < 2 \*"),
        ({"noise": "clients"}, r"privacy.noise='clients' must be one of server, distributed"),
        ({"noise": "distributed", "noise_colluders": -1}, r"privacy.noise_colluders=-1 must be >= 0"),
        ({"noise": "distributed", "adaptive_clip": True}, r"adaptive_clip=true: the clipped count's noise is the"),
    ],
)
def test_impossible_dp_settings_fail_naming_the_value(kwargs, pattern):
    base = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1, "num_clients": 100}
    with pytest.raises(ValueError, match=pattern):
        DPParams(**{**base, **kwargs})


def test_expected_clients_and_default_count_noise_follow_q_and_n():
    p = DPParams(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, num_clients=100, adaptive_clip=True)
    assert p.expected_clients == pytest.approx(10.0)
    assert p.clipped_count_std == pytest.approx(1.0)  # max(10 / 20, z)
    assert p.update_multiplier == pytest.approx(update_noise_multiplier(1.0, 1.0))
    many = DPParams(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_clients=1000, adaptive_clip=True)
    assert many.clipped_count_std == pytest.approx(25.0)  # Andrew et al.'s expected clients / 20


def test_each_noise_share_is_z_c_over_the_root_of_the_honest_shares():
    assert noise_share_std(0.5, 2.0, threshold=5, colluders=1) == pytest.approx(0.5 * 2.0 / 2.0)
    assert noise_share_std(0.5, 2.0, threshold=3, colluders=2) == pytest.approx(1.0)  # one honest share carries it all
    with pytest.raises(ValueError, match="threshold 3 and 3 tolerated colluders leaves no honest share"):
        noise_share_std(0.5, 2.0, threshold=3, colluders=3)


def test_the_quantiser_range_holds_the_clip_norm_plus_eight_share_deviations():
    assert noise_share_range(1.0, 0.25) == pytest.approx(3.0)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0])
def test_a_clip_norm_of_zero_or_below_is_refused_naming_it(clip_norm):
    with pytest.raises(ValueError, match=rf"^clip norm {clip_norm} must be positive$"):
        clip_update({"a": np.array([3.0, 4.0])}, clip_norm)


def test_an_update_whose_norm_equals_the_clip_norm_exactly_is_returned_unscaled_and_not_counted_as_clipped():
    clipped, scaled = clip_update({"a": np.array([3.0, 0.0]), "b": np.array([4.0])}, 5.0)  # joint norm exactly 5
    assert not scaled
    np.testing.assert_array_equal(clipped["a"], [3.0, 0.0])
    np.testing.assert_array_equal(clipped["b"], [4.0])


def test_an_update_within_the_clip_norm_comes_back_as_new_arrays_that_do_not_share_the_inputs_memory():
    update = {"a": np.array([0.3, 0.4], dtype=np.float32)}
    clipped, _ = clip_update(update, 1.0)
    assert not np.shares_memory(clipped["a"], update["a"])
    clipped["a"][0] = 9.0
    np.testing.assert_array_equal(update["a"], np.array([0.3, 0.4], dtype=np.float32))


def test_a_clipped_float32_update_stays_float32():
    clipped, scaled = clip_update({"a": np.array([3.0, 4.0], dtype=np.float32)}, 1.0)
    assert scaled and clipped["a"].dtype == np.float32
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)


def test_join_and_split_update_keep_a_name_that_contains_the_separator():
    parts = {"arrays": {"a::b": np.ones(2)}, "c-delta": {"a::b::c": np.zeros(1)}}
    back = split_update(join_update(parts))
    assert set(back) == {"arrays", "c-delta"}
    np.testing.assert_array_equal(back["arrays"]["a::b"], np.ones(2))
    np.testing.assert_array_equal(back["c-delta"]["a::b::c"], np.zeros(1))
    assert set(back["arrays"]) == {"a::b"} and set(back["c-delta"]) == {"a::b::c"}


def test_the_norm_of_float32_and_integer_updates_is_taken_in_float64_without_overflow():
    # float32 squares overflow above ~1.8e19; int8 squares above 11
    assert l2_norm({"a": np.array([3e20], dtype=np.float32), "b": np.array([4e20], dtype=np.float32)}) == (
        pytest.approx(5e20, rel=1e-6)
    )
    assert l2_norm({"a": np.array([100, 100], dtype=np.int8)}) == pytest.approx(100 * math.sqrt(2))


@pytest.mark.parametrize("expected", [0.0, -2.0])
def test_a_mean_over_zero_or_fewer_expected_clients_is_refused_with_the_whole_message(expected):
    with pytest.raises(ValueError) as err:
        fixed_weight_mean([{"w": np.ones(1)}], expected, {"w": np.zeros(1)})
    assert str(err.value) == f"expected clients {expected} must be positive"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0}, "privacy.noise_multiplier=0.0 must be positive; e.g. privacy.noise_multiplier=1.0"),
        ({"sample_rate": 0.0}, "the sample rate sample_clients/num_clients=0.0 must be in (0, 1]"),
        ({"sample_rate": 1.5}, "the sample rate sample_clients/num_clients=1.5 must be in (0, 1]"),
        ({"target_quantile": 0.0}, "privacy.target_quantile=0.0 must be in (0, 1); e.g. 0.5"),
        ({"clip_lr": 0.0}, "privacy.clip_lr=0.0 must be positive; e.g. 0.2"),
        (
            {"noise": "distributed", "adaptive_clip": True},
            "privacy.noise=distributed with privacy.adaptive_clip=true: the clipped count's noise is the server's to "
            "add; set privacy.adaptive_clip=false or privacy.noise=server",
        ),
    ],
)
def test_a_dp_setting_at_the_edge_of_its_range_is_refused_with_the_whole_message(kwargs, message):
    base = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1, "num_clients": 100}
    with pytest.raises(ValueError) as err:
        DPParams(**{**base, **kwargs})
    assert str(err.value) == message


def test_a_sample_rate_of_one_is_allowed():
    assert DPParams(clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, num_clients=4).expected_clients == 4.0

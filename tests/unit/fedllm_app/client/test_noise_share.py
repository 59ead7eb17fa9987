"""A client's distributed-noise share (``privacy.noise=distributed``): its std, its draw, and the quantiser range
it refuses to be clipped by. Hand-computable values; the statistical check uses 200,000 draws, whose sample std
has a relative standard error of 1 / sqrt(400,000) = 0.16%, far inside the 2% tolerance.
"""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedllm_app.client.secure import add_noise_share, share_std
from strategies.dp import CLIP_NORM_KEY, NOISE_COLLUDERS_KEY, NOISE_MULTIPLIER_KEY
from strategies.privacy import noise_share_range, noise_share_std, secure_rng


def train_conf(z=0.6, c=2.0, colluders=1):
    return ConfigRecord({CLIP_NORM_KEY: c, NOISE_MULTIPLIER_KEY: z, NOISE_COLLUDERS_KEY: colluders})


def test_the_share_std_is_z_c_over_the_root_of_the_honest_shares_so_t_minus_c_of_them_carry_z_c():
    assert share_std(train_conf(), threshold=5) == pytest.approx(0.6 * 2.0 / 2.0)  # sqrt(5 - 1) = 2
    assert noise_share_std(1.0, 1.0, threshold=3, colluders=0) == pytest.approx(1 / np.sqrt(3))
    for t, c in [(2, 0), (3, 1), (10, 4)]:  # (t - c) shares of variance s^2 give exactly (z C)^2
        assert (t - c) * noise_share_std(0.7, 1.5, t, c) ** 2 == pytest.approx((0.7 * 1.5) ** 2)
    assert noise_share_range(1.0, 0.5) == pytest.approx(5.0)  # C + 8 s


def test_a_client_without_distributed_noise_in_its_train_config_adds_no_share():
    assert share_std(ConfigRecord({CLIP_NORM_KEY: 1.0}), threshold=3) is None


def test_as_many_colluders_as_the_threshold_leave_no_honest_share_and_are_refused():
    with pytest.raises(ValueError, match="threshold 3 and 3 tolerated colluders leaves no honest share"):
        share_std(train_conf(colluders=3), threshold=3)


def test_the_client_adds_gaussian_noise_of_the_share_std_to_every_coordinate():
    update = np.linspace(-0.002, 0.002, 200_000)
    noised = add_noise_share(update, 0.6, 2.0, 7.0, secure_rng())
    noise = noised - update
    assert noise.std() == pytest.approx(0.6, rel=0.02)
    assert abs(noise.mean()) < 7 * 0.6 / np.sqrt(noise.size)  # seven standard errors
    again = add_noise_share(update, 0.6, 2.0, 7.0, secure_rng()) - update
    assert abs(np.corrcoef(noise, again)[0, 1]) < 0.02  # a fresh draw from the OS's entropy every time


def test_a_quantiser_range_that_would_clip_the_share_is_refused_naming_the_setting_and_the_fix():
    with pytest.raises(ValueError, match=r"privacy.secagg_clip_range=1 would clip .* set privacy.secagg_clip_range=5"):
        add_noise_share(np.zeros(3), 0.5, 1.0, 1.0, secure_rng())


def test_a_coordinate_the_quantiser_clips_anyway_is_logged_on_the_node(caplog):
    """Coordinates at the range's edge (an update its client did not clip): about half the noised ones leave it."""
    with caplog.at_level(logging.WARNING):
        add_noise_share(np.full(1000, 5.0), 0.5, 1.0, 5.0, secure_rng())
    assert "noised coordinates left [-5, 5] and were clipped by the quantiser" in caplog.text

"""The accountant credits Poisson subsampling and agrees with dp-accounting computed independently."""

import logging
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from strategies.accounting import _quiet_absl, _rdp_one_round, epsilon, noise_for_epsilon


@pytest.fixture(autouse=True)
def fresh_accountant_caches():
    """Each test computes its epsilons itself, not from values an earlier test (or process) left in the caches."""
    epsilon.cache_clear()
    _rdp_one_round.cache_clear()


def independent(q: float, z: float, rounds: int, delta: float, accountant) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.1, 1.0, 100), (0.05, 0.8, 30), (0.5, 2.0, 7)])
def test_rdp_epsilon_equals_dp_accounting_for_the_same_q_z_and_rounds(q, z, rounds):
    assert epsilon(q, z, rounds, 1e-5, "rdp") == pytest.approx(independent(q, z, rounds, 1e-5, rdp.RdpAccountant()))


def test_pld_epsilon_equals_dp_accounting_for_the_same_q_z_and_rounds():
    ours = epsilon(0.1, 1.0, 20, 1e-5, "pld")
    assert ours == pytest.approx(independent(0.1, 1.0, 20, 1e-5, pld.PLDAccountant()), rel=1e-6)


def test_the_issue_numbers_hold_for_z_1_q_0_1_100_rounds_delta_1e_5():
    assert epsilon(0.1, 1.0, 100, 1e-5, "rdp") == pytest.approx(7.90, abs=0.01)
    assert epsilon(0.1, 1.0, 100, 1e-5, "pld") == pytest.approx(7.05, abs=0.01)


def test_epsilon_grows_with_rounds_and_is_zero_before_any():
    assert epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert epsilon(0.1, 1.0, 10, 1e-5) < epsilon(0.1, 1.0, 11, 1e-5)


def test_the_derived_noise_multiplier_is_the_smallest_that_meets_the_target():
    z = noise_for_epsilon(4.0, 0.1, 50, 1e-5, "rdp")
    assert epsilon(0.1, z, 50, 1e-5, "rdp") <= 4.0
    assert epsilon(0.1, z * 0.99, 50, 1e-5, "rdp") > 4.0


def test_an_unknown_accountant_is_refused_by_name():
    with pytest.raises(ValueError, match=r"privacy.accountant='moments' must be one of rdp, pld"):
        epsilon(0.1, 1.0, 3, 1e-5, "moments")


@pytest.mark.slow
def test_the_derived_pld_noise_multiplier_meets_the_target_with_no_more_noise_than_rdp():
    rdp_z, pld_z = (noise_for_epsilon(8.0, 0.1, 30, 1e-5, kind) for kind in ("rdp", "pld"))
    assert pld_z <= rdp_z
    assert 7.9 < epsilon(0.1, pld_z, 30, 1e-5, "pld") <= 8.0


def gaussian_epsilon(z: float, rounds: int, delta: float, accountant) -> float:
    """Epsilon of ``rounds`` plain Gaussian mechanisms (a round at sampling rate 1), from dp-accounting itself."""
    return accountant.compose(dp_accounting.GaussianDpEvent(z), rounds).get_epsilon(delta)


def analytic_gaussian_noise(target_epsilon: float, delta: float) -> float:
    """The exact smallest noise multiplier of one Gaussian mechanism at (epsilon, delta) (Balle & Wang 2018, Thm. 8):
    the root in z of ``Phi(1 / 2z - eps z) - e^eps Phi(-1 / 2z - eps z) = delta``.
    """
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(z: float) -> float:
        a, b = 1 / (2 * z) - target_epsilon * z, -1 / (2 * z) - target_epsilon * z
        return norm.cdf(a) - math.exp(target_epsilon) * norm.cdf(b) - delta

    return brentq(gap, 0.1, 20.0, xtol=1e-12)


def test_a_round_at_full_rate_is_accounted_as_the_plain_gaussian_mechanism():
    plain = gaussian_epsilon(1.5, 3, 1e-5, pld.PLDAccountant())
    assert epsilon(1.0, 1.5, 3, 1e-5, "pld") == pytest.approx(plain, rel=1e-12)  # not Poisson-sampled at q = 1


@pytest.mark.parametrize("target", [0.5, 2.0, 5.0])
def test_the_rdp_noise_multiplier_meets_the_target_and_is_the_smallest_within_the_search_tolerance(target):
    # q = 1, one round: the Gaussian mechanism, fast to account; the search's tolerance is 1e-4, and the library
    # may move its root by one more tolerance to meet the target
    z = noise_for_epsilon(target, 1.0, 1, 1e-5, "rdp")
    assert gaussian_epsilon(z, 1, 1e-5, rdp.RdpAccountant()) <= target
    assert gaussian_epsilon(z - 2e-4, 1, 1e-5, rdp.RdpAccountant()) > target


def test_the_noise_multiplier_is_searched_with_rdp_unless_told_otherwise():
    assert noise_for_epsilon(2.0, 1.0, 1, 1e-5) == noise_for_epsilon(2.0, 1.0, 1, 1e-5, "rdp")


def test_the_pld_noise_multiplier_is_the_exact_gaussian_one_and_below_rdps():
    # one round at q = 1 is one Gaussian mechanism, whose smallest z has a closed form; PLD's search
    # (tolerance 1e-3) finds it, RDP (an upper bound on epsilon) needs more noise
    pld_z = noise_for_epsilon(2.0, 1.0, 1, 1e-5, "pld")
    assert pld_z == pytest.approx(analytic_gaussian_noise(2.0, 1e-5), abs=1e-3)
    assert gaussian_epsilon(pld_z, 1, 1e-5, pld.PLDAccountant()) <= 2.0
    assert gaussian_epsilon(pld_z - 2e-3, 1, 1e-5, pld.PLDAccountant()) > 2.0
    assert pld_z < noise_for_epsilon(2.0, 1.0, 1, 1e-5, "rdp") - 0.1


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_a_target_epsilon_of_zero_or_below_is_refused_naming_it(target):
    with pytest.raises(ValueError, match=rf"^privacy.target_epsilon={target} must be positive$"):
        noise_for_epsilon(target, 0.1, 10, 1e-5)


def test_the_noise_search_refuses_an_unknown_accountant_by_name():
    with pytest.raises(ValueError, match=r"^privacy.accountant='moments' must be one of rdp, pld$"):
        noise_for_epsilon(2.0, 1.0, 1, 1e-5, "moments")


def test_the_accountants_absl_warnings_are_silenced_inside_the_block_and_the_level_restored_after():
    absl, root = logging.getLogger("absl"), logging.getLogger()
    before, root_level = absl.level, root.level
    absl.setLevel(logging.INFO)
    try:
        with _quiet_absl():
            assert absl.level == logging.ERROR
            assert root.level == root_level  # only absl's logger: the run's own warnings still show
        assert absl.level == logging.INFO
    finally:
        absl.setLevel(before)

"""The accountant credits Poisson subsampling and agrees with dp-accounting computed independently."""

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from strategies.accounting import epsilon, noise_for_epsilon


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

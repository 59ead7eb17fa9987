"""The privacy accountant of DP-FedAvg: epsilon after T rounds of the Poisson-subsampled Gaussian mechanism.

Built on Google's ``dp-accounting`` (the library Flower's own accountant wraps), with subsampling credited:
each round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, composed T times, and the epsilon at
``delta`` comes from Rényi DP (``rdp``, Mironov 2017; an upper bound) or from privacy loss distributions
(``pld``, tighter). The amplification holds only because the server samples each partition independently
with probability q each round (:func:`strategies.sampling.secret_poisson_partitions`).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

ACCOUNTANTS = ("rdp", "pld")


def _event(sample_rate: float, noise_multiplier: float, rounds: int):  # noqa: ANN202 - dp_accounting's DpEvent
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def _accountant(kind: str):  # noqa: ANN202
    from dp_accounting import pld, rdp

    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"privacy.accountant={kind!r} must be one of {', '.join(ACCOUNTANTS)}")


@lru_cache(maxsize=64)
def _rdp_one_round(sample_rate: float, noise_multiplier: float) -> tuple[Any, Any]:
    """The RDP orders and one round's RDP of the mechanism (RDP composes by adding: T rounds cost T times this).

    Reads the accountant's ``_rdp`` vector (dp-accounting 0.6; pinned below 0.7, and the tests compare the
    result with the library's own composition), so a run computes the expensive vector once, not each round.
    """
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    with _quiet_absl():
        accountant.compose(_event(sample_rate, noise_multiplier, 1))
    return accountant._orders, accountant._rdp  # noqa: SLF001


@lru_cache(maxsize=256)
def epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds with sampling rate q and noise multiplier z (0 rounds: 0)."""
    if rounds <= 0:
        return 0.0
    accountant = _accountant(kind)  # an unknown kind fails here, by name
    if kind == "rdp":
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        orders, one = _rdp_one_round(sample_rate, noise_multiplier)
        return float(compute_epsilon(orders, one * rounds, delta)[0])
    with _quiet_absl():
        accountant.compose(_event(sample_rate, noise_multiplier, rounds))
        return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, sample_rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """The smallest noise multiplier z whose epsilon after ``rounds`` rounds is at most ``target_epsilon``.

    Searched with RDP from z = 0.01 up; PLD's z (never above RDP's, PLD being tighter) is then searched between
    half RDP's z and RDP's z, where its discretisation stays small (a PLD at z near 0 would need gigabytes).
    """
    import dp_accounting

    if target_epsilon <= 0:
        raise ValueError(f"privacy.target_epsilon={target_epsilon} must be positive")
    _accountant(kind)  # an unknown kind fails here, by name
    with _quiet_absl():
        z = float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _accountant("rdp"),
                lambda z: _event(sample_rate, z, rounds),
                target_epsilon,
                delta,
                dp_accounting.LowerEndpointAndGuess(0.01, 1.0),
                tol=1e-4,
            )
        )
        if kind == "rdp":
            return z
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _accountant(kind),
                lambda z: _event(sample_rate, z, rounds),
                target_epsilon,
                delta,
                dp_accounting.ExplicitBracketInterval(z / 2, z),
                tol=1e-3,
            )
        )


class _quiet_absl:
    """Silence absl's per-order convergence warnings of the RDP accountant (orders it excludes, harmlessly)."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *_: object) -> None:
        self.logger.setLevel(self.level)

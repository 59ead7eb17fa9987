"""User-level differential privacy for federated averaging (DP-FedAvg, McMahan et al. 2018): pure math.

Every function works on ``dict[str, np.ndarray]`` updates (an update is what a client adds to the global
adapter; SCAFFOLD's is the adapter delta and the control delta, merged into one dict with distinct names so
that both are clipped *together* to one norm). The server's release of one round is

    noised_mean = (sum_k clip(update_k, C)) / expected_clients + N(0, (z C / expected_clients)^2)

where ``expected_clients = q N`` is fixed before the round (never the realised count, which would leak who
took part), so that adding or removing one user's data changes the sum by at most ``C``: the Gaussian
mechanism with noise multiplier ``z``. Any server step that follows (FedAvgM's momentum, FedOpt's moments,
SCAFFOLD's ``x`` and ``c``) acts on ``noised_mean`` only, which is post-processing.

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping") moves
``C`` geometrically towards the ``target_quantile`` of the update norms, from a noised centred count of the
clients whose update was within ``C`` (``sum_i (b_i - 1/2)``, sensitivity 1/2); the noise budget is split
between the count and the update (:func:`update_noise_multiplier`) so that the round as a
whole is still the Gaussian mechanism with ``z``.

Distributed noise (``noise="distributed"``, with secure aggregation): instead of the server, each sampled
client adds ``N(0, s^2)`` to its clipped update before masking, with ``s = z C / sqrt(t - c)``
(:func:`noise_share_std`): the round unmasks only with at least ``t`` survivors, so the unmasked sum carries at
least ``t`` shares, and even after ``c`` colluding clients subtract their own, variance ``>= (z C)^2``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from strategies.aggregation import Arrays

# Who adds the Gaussian noise: the server to the mean (central DP), or each client a share before masking.
NOISE_PLACEMENTS = ("server", "distributed")
# A distributed-noise coordinate (within C, plus a share of std s) stays inside the quantiser's range
# C + QUANTISER_SIGMAS s but with probability 2 Phi(-8) ~ 1.2e-15 per coordinate.
QUANTISER_SIGMAS = 8.0


def l2_norm(update: Arrays) -> float:
    """The L2 norm of all arrays of ``update`` taken together (float64)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip_update(update: Arrays, clip_norm: float) -> tuple[Arrays, bool]:
    """``update`` scaled by ``min(1, C / ||update||)`` over all its arrays together; and whether it was scaled.

    The scale is computed in float64 and applied to each array's own dtype; the returned arrays are new.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip norm {clip_norm} must be positive")
    norm = l2_norm(update)
    if norm <= clip_norm:
        return {k: np.array(v, copy=True) for k, v in update.items()}, False
    scale = clip_norm / norm
    return {k: (v.astype(np.float64) * scale).astype(v.dtype) for k, v in update.items()}, True


def fixed_weight_mean(updates: list[Arrays], expected_clients: float, like: Arrays) -> Arrays:
    """``sum_k update_k / expected_clients``; zeros shaped like ``like`` when no update arrived."""
    if expected_clients <= 0:
        raise ValueError(f"expected clients {expected_clients} must be positive")
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in like.items()}
    for u in updates:
        for k in total:
            total[k] += u[k]
    return {k: v / expected_clients for k, v in total.items()}


def noise_std(noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """The standard deviation of the Gaussian noise on the mean: ``z C / expected_clients``."""
    return noise_multiplier * clip_norm / expected_clients


def add_gaussian_noise(mean: Arrays, std: float, rng: np.random.Generator) -> Arrays:
    """``mean`` plus independent ``N(0, std^2)`` noise on every coordinate (float64)."""
    return {k: np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v)) for k, v in mean.items()}


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS's entropy: DP noise must not be reproducible from the run's seed."""
    return np.random.default_rng(secrets.randbits(128))


def noise_share_std(noise_multiplier: float, clip_norm: float, threshold: int, colluders: int) -> float:
    """The std ``s = z C / sqrt(t - c)`` of one client's noise share under distributed noise.

    At least ``threshold`` (t) shares reach the unmasked sum; ``colluders`` (c) of them may be known to the
    server (colluding clients subtract their own), so the rest carry variance ``(t - c) s^2 = (z C)^2``, the
    noise the accountant assumes on the sum. Raises ValueError unless ``t - c >= 1``.
    """
    honest = threshold - colluders
    if honest < 1:
        raise ValueError(
            f"distributed noise with threshold {threshold} and {colluders} tolerated colluders leaves no honest "
            f"share; lower privacy.noise_colluders below the secure-aggregation threshold"
        )
    return noise_multiplier * clip_norm / math.sqrt(honest)


def noise_share_range(clip_norm: float, share_std: float) -> float:
    """The quantiser range ``C + 8 s`` that holds a clipped coordinate plus a share of std ``s``
    (:data:`QUANTISER_SIGMAS`): what ``privacy.secagg_clip_range`` must reach under distributed noise.
    """
    return clip_norm + QUANTISER_SIGMAS * share_std


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """The updates' noise multiplier when a noised count of std ``count_std`` is released as well.

    Andrew et al. (2021), Thm. 1: releasing the CENTRED count ``sum_i (b_i - 1/2)`` (sensitivity 1/2, see
    :func:`noised_fraction_within`) with noise ``count_std`` and the update sum with ``z_delta`` costs as much as
    one Gaussian mechanism with ``z = (z_delta^-2 + (2 count_std)^-2)^(-1/2)``
    (:func:`combined_noise_multiplier`); so ``z_delta = (z^-2 - (2 count_std)^-2)^(-1/2)``.
    """
    rest = noise_multiplier**-2 - (2.0 * count_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"noise multiplier {noise_multiplier} is too large for a clipped-count noise of std {count_std}: "
            f"it needs noise_multiplier < 2 * count_std = {2 * count_std:g}"
        )
    return rest**-0.5


def combined_noise_multiplier(update_multiplier: float, count_std: float) -> float:
    """The noise multiplier of the pair (update sum with ``update_multiplier``, centred count with ``count_std``).

    Each user moves the update sum by at most C (noise ``update_multiplier * C``) and the centred count by at
    most 1/2 (noise ``count_std``, i.e. multiplier ``2 count_std``); together, one Gaussian mechanism with
    ``(update_multiplier^-2 + (2 count_std)^-2)^(-1/2)``.
    """
    return (update_multiplier**-2 + (2.0 * count_std) ** -2) ** -0.5


def noised_fraction_within(within: float, reports: int, expected_clients: float, noise: float) -> float:
    """The released estimate of the fraction of updates within C: ``(sum_i (b_i - 1/2) + noise) / qN + 1/2``.

    ``within``: ``sum_i b_i`` over the ``reports`` clients that replied (each ``b_i`` in {0, 1}); ``noise``: a
    draw of ``N(0, count_std^2)``. Centring each bit on 1/2 makes the noised sum's sensitivity 1/2 whether a
    user is added or removed (with ``b_i`` or not), which the noise split of :func:`update_noise_multiplier`
    assumes; the uncentred ``sum_i b_i`` has sensitivity 1 and would cost twice the count's share.
    """
    if expected_clients <= 0:
        raise ValueError(f"expected clients {expected_clients} must be positive")
    return (within - 0.5 * reports + noise) / expected_clients + 0.5


def adapt_clip_norm(clip_norm: float, fraction: float, target_quantile: float, clip_lr: float) -> float:
    """The next round's clip norm (geometric update): ``C exp(-clip_lr (fraction - target_quantile))``.

    ``fraction``: the released (noised) estimate of the fraction of updates within C,
    :func:`noised_fraction_within`.
    """
    return clip_norm * math.exp(-clip_lr * (fraction - target_quantile))


@dataclass(frozen=True)
class DPParams:
    """The ``privacy`` section's DP settings, as the strategy applies them.

    Attributes
    ----------
    clip_norm : float
        C: every client's update (all its arrays together) is clipped to this L2 norm; the initial value
        under adaptive clipping. > 0.
    noise_multiplier : float
        z: the std of the noise on the update sum is ``z C``. > 0.
    sample_rate : float
        q: each partition trains a round with this probability (Poisson sampling), in (0, 1].
    num_clients : int
        N: the partitions; the mean divides the clipped sum by ``q N``.
    adaptive_clip : bool
        Adapt C to ``target_quantile`` of the update norms each round (Andrew et al. 2021).
    target_quantile : float
        The quantile of the update norms C moves to, in (0, 1).
    clip_lr : float
        Step size of the geometric clip-norm update, > 0.
    count_std : float or None
        Std of the noise on the count of updates within C; None: ``max(q N / 20, z)`` (Andrew et al. take
        ``q N / 20``, meant for hundreds of clients per round; at least z keeps the updates' share of the noise
        within 1.16 z for few clients).
    noise : str
        Who adds the noise (:data:`NOISE_PLACEMENTS`): ``server`` (to the mean) or ``distributed`` (each
        client a share of std :func:`noise_share_std` before secure aggregation masks it; the server adds none).
        Distributed noise does not combine with adaptive clipping (whose count noise the server adds).
    noise_colluders : int
        c: clients that may collude with the server under distributed noise (they know their own shares);
        each share is sized so that the others still carry ``(z C)^2``. >= 0.
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    num_clients: int
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_std: float | None = None
    noise: str = "server"
    noise_colluders: int = 0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"privacy.clip_norm={self.clip_norm} must be positive; e.g. privacy.clip_norm=1.0")
        if not self.noise_multiplier > 0:
            raise ValueError(
                f"privacy.noise_multiplier={self.noise_multiplier} must be positive; e.g. privacy.noise_multiplier=1.0"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"the sample rate sample_clients/num_clients={self.sample_rate} must be in (0, 1]")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"privacy.target_quantile={self.target_quantile} must be in (0, 1); e.g. 0.5")
        if not self.clip_lr > 0:
            raise ValueError(f"privacy.clip_lr={self.clip_lr} must be positive; e.g. 0.2")
        if self.adaptive_clip:
            update_noise_multiplier(self.noise_multiplier, self.clipped_count_std)
        self._check_noise()

    def _check_noise(self) -> None:
        if self.noise not in NOISE_PLACEMENTS:
            raise ValueError(f"privacy.noise={self.noise!r} must be one of {', '.join(NOISE_PLACEMENTS)}")
        if not self.noise_colluders >= 0:
            raise ValueError(f"privacy.noise_colluders={self.noise_colluders} must be >= 0; e.g. 0")
        if self.distributed and self.adaptive_clip:
            raise ValueError(
                "privacy.noise=distributed with privacy.adaptive_clip=true: the clipped count's noise is the "
                "server's to add; set privacy.adaptive_clip=false or privacy.noise=server"
            )

    @property
    def distributed(self) -> bool:
        """Whether the clients add the noise (as shares, under secure aggregation) instead of the server."""
        return self.noise == "distributed"

    @property
    def expected_clients(self) -> float:
        """``q N``: the fixed denominator of the mean."""
        return self.sample_rate * self.num_clients

    @property
    def clipped_count_std(self) -> float:
        """Std of the noise on the count of updates within C (adaptive clipping)."""
        if self.count_std is not None:
            return self.count_std
        return max(self.expected_clients / 20.0, self.noise_multiplier)

    @property
    def update_multiplier(self) -> float:
        """The noise multiplier on the update sum: z, or less than z when the count takes its share."""
        if not self.adaptive_clip:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.clipped_count_std)

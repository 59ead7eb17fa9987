"""DP-FedAvg around any averaging strategy: Poisson sampling, clip, fixed-weight mean, noise, then the strategy's step.

:func:`with_dp` turns a strategy class (FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi, SCAFFOLD) into
one whose round is user-level differentially private (McMahan et al. 2018; math in :mod:`strategies.privacy`):

1. each partition trains with probability ``q = sample_clients / num_clients`` (Poisson sampling,
   :func:`strategies.sampling.secret_poisson_partitions`), which the accountant credits: drawn with a secret
   key created at run start (kept in :meth:`DPStrategy.state_dict` for resuming), never the public seed;
2. the server clips every reply's update (adapter delta, and SCAFFOLD's control delta with it) to ``C``
   again, whatever the client did, sums them with weight 1 each and divides by ``q N``;
3. adds ``N(0, (z C / q N)^2)`` noise to that mean, from the OS's entropy;
4. hands the noised mean to the strategy's :meth:`~strategies.fedavg.FedAvgLoRA.step_from_mean` (FedAvgM's
   momentum, FedOpt's moments, SCAFFOLD's ``x`` and ``c`` act on the noised mean only: post-processing).

With ``noise="distributed"`` (secure aggregation only: :meth:`DPStrategy.step_from_sum`), step 3 is the
clients': each adds a share of std :func:`strategies.privacy.noise_share_std` to its clipped update before
masking it, and the server adds none; the unmasked sum already carries noise of variance ``>= (z C)^2``.

Every round releases a noised mean, even when no reply arrived. The epsilon spent after each round comes
from :mod:`strategies.accounting`; :meth:`DPStrategy.may_run` says whether a round fits ``target_epsilon``.

Client contract
---------------
The strategy's own, plus: the train config carries ``dp-clip-norm`` (this round's ``C``); the client clips
its update (``trained - global``, with its ``c-delta`` under SCAFFOLD, all arrays together) to that norm
before replying and reports ``dp-within-clip`` (1.0 if the update's norm was at most ``C``, else 0.0) in its
metrics, which adaptive clipping counts (with noise). Under distributed noise the train config also
carries ``dp-noise-multiplier`` (z) and ``dp-noise-colluders`` (c): the client adds a share of std
``z C / sqrt(t - c)`` (t: the round's secure-aggregation threshold) to its clipped update before masking it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from strategies.accounting import ACCOUNTANTS, epsilon
from strategies.aggregation import Arrays
from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, FedAvgLoRA
from strategies.privacy import (
    DPParams,
    adapt_clip_norm,
    add_gaussian_noise,
    clip_update,
    fixed_weight_mean,
    l2_norm,
    noise_share_std,
    noise_std,
    noised_fraction_within,
    secure_rng,
)
from strategies.records import from_record, to_record
from strategies.sampling import SAMPLING_KEY_BYTES, secret_poisson_partitions

CLIP_NORM_KEY = "dp-clip-norm"
WITHIN_CLIP_KEY = "dp-within-clip"
NOISE_MULTIPLIER_KEY = "dp-noise-multiplier"  # distributed noise: z, for the clients' shares
NOISE_COLLUDERS_KEY = "dp-noise-colluders"  # distributed noise: c, the colluders each share allows for
SEPARATOR = "::"
# A reply whose update exceeds C by more than float32 rounding was not clipped by its client.
CLIENT_CLIP_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Accounting:
    """How the privacy spent is counted and bounded (``privacy.delta``, ``privacy.accountant``,
    ``privacy.target_epsilon``; None: no bound, the run reports epsilon only).
    """

    delta: float = 1e-5
    accountant: str = "rdp"
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta} must be in (0, 1); e.g. 1e-5 (below 1 / the number of users)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r} must be one of {', '.join(ACCOUNTANTS)}")


def join_update(parts: dict[str, Arrays]) -> Arrays:
    """One flat update from named parts (``{"arrays": adapter delta, "c-delta": ...}``), to clip them together."""
    return {f"{part}{SEPARATOR}{name}": v for part, arrays in parts.items() for name, v in arrays.items()}


def split_update(flat: Arrays) -> dict[str, Arrays]:
    """The inverse of :func:`join_update`."""
    parts: dict[str, Arrays] = {}
    for key, v in flat.items():
        part, name = key.split(SEPARATOR, 1)
        parts.setdefault(part, {})[name] = v
    return parts


def clip_reply_parts(
    global_: Arrays, trained: Arrays, extras: dict[str, Arrays], clip_norm: float
) -> tuple[Arrays, dict[str, Arrays], bool]:
    """A client's reply clipped to ``clip_norm``: (trained adapter, extra deltas, whether it was scaled)."""
    adapter = {k: trained[k].astype(np.float64) - global_[k].astype(np.float64) for k in global_}
    clipped, scaled = clip_update(join_update({ARRAYS_KEY: adapter, **extras}), clip_norm)
    parts = split_update(clipped)
    new = {k: (global_[k].astype(np.float64) + parts[ARRAYS_KEY][k]).astype(trained[k].dtype) for k in global_}
    extra = {p: {k: v.astype(np.float32) for k, v in a.items()} for p, a in parts.items() if p != ARRAYS_KEY}
    return new, extra, scaled


def within_clip(reply: Message) -> float:
    """A reply's ``dp-within-clip`` bit: 1.0 or 0.0 (any other value counts as its nearer bit, absent as 0), so
    that one client moves the adaptive clipping count by at most 1, the sensitivity its noise covers.
    """
    return 1.0 if float(reply.content[METRICS_KEY].get(WITHIN_CLIP_KEY, 0.0)) >= 0.5 else 0.0


class DPStrategy:
    """The DP round, placed before the strategy class in the method order (:func:`with_dp`)."""

    dp: DPParams
    accounting: Accounting

    def __init__(
        self, *, dp: DPParams, accounting: Accounting | None = None, rng: np.random.Generator | None = None, **kw: Any
    ) -> None:
        self.dp, self.accounting = dp, accounting or Accounting()
        super().__init__(**kw)
        self.clip_norm = dp.clip_norm
        self.rng = rng if rng is not None else secure_rng()
        self.sampling_key = secrets.token_bytes(SAMPLING_KEY_BYTES)  # the secret Poisson sample's key
        self.dp_global: Arrays | None = None
        self.dp_metrics: dict[str, float] = {}

    def describe(self) -> str:
        d, a = self.dp, self.accounting
        return (
            f"{super().describe()}; DP-FedAvg clip_norm {d.clip_norm} noise_multiplier {d.noise_multiplier} "
            f"Poisson rate {d.sample_rate:g} (expected {d.expected_clients:g} clients) adaptive_clip {d.adaptive_clip} "
            f"accountant {a.accountant} delta {a.delta:g} target_epsilon {a.target_epsilon} noise {d.noise}"
            + (f" (tolerating {d.noise_colluders} colluding clients)" if d.distributed else "")
        )

    def privacy_spent(self, rounds: int) -> float:
        """Epsilon at ``accounting.delta`` after ``rounds`` DP rounds."""
        a = self.accounting
        return epsilon(self.dp.sample_rate, self.dp.noise_multiplier, rounds, a.delta, a.accountant)

    def may_run(self, server_round: int) -> bool:
        """Whether round ``server_round`` keeps epsilon within ``target_epsilon``."""
        target = self.accounting.target_epsilon
        return target is None or self.privacy_spent(server_round) <= target

    def round_partitions(self, server_round: int, available: Iterable[int] | None = None) -> list[int]:
        pool = range(self.num_clients) if available is None else available
        return secret_poisson_partitions(self.sampling_key, server_round, self.num_clients, self.dp.sample_rate, pool)

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().train_config(server_round, config)
        out[CLIP_NORM_KEY] = float(self.clip_norm)
        if self.dp.distributed:
            out[NOISE_MULTIPLIER_KEY] = float(self.dp.noise_multiplier)
            out[NOISE_COLLUDERS_KEY] = int(self.dp.noise_colluders)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.dp_global = from_record(arrays)
        self.dp_metrics = {}  # a round that releases nothing (failed secure aggregation) reports none
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each reply's update, take the fixed-weight mean, add noise, apply the strategy's step."""
        if self.dp_global is None:
            return None, None
        if self.dp.distributed:  # each plain reply would carry one client's share only: far too little noise
            raise RuntimeError("privacy.noise=distributed needs secure aggregation: set privacy.secagg=true")
        ok = [m for m in replies if not m.has_error()]
        global_, c = self.dp_global, self.clip_norm
        updates, per_partition, over = [], {}, 0
        for msg in ok:
            update = join_update(self.reply_update(msg, global_))
            over += l2_norm(update) > c * (1 + CLIENT_CLIP_TOLERANCE)
            clipped, _ = clip_update(update, c)
            updates.append(clipped)
            per_partition[self.sent_partition(msg)] = split_update(clipped)
        new = self._release(updates, per_partition, ok, over)
        metrics = self.train_metrics_aggr_fn([m.content for m in ok], self.weighted_by_key) if ok else MetricRecord()
        return new, metrics

    def step_from_sum(
        self, total: dict[str, Arrays], replies: list[Message], threshold: int | None = None
    ) -> ArrayRecord | None:
        """The DP round on the SUM of the clients' updates computed elsewhere (secure aggregation: the server
        never sees one update, so it cannot clip them; each client clipped its own to ``C``): the fixed-weight
        mean, the noise, the strategy's step. ``total`` is by part, as :meth:`reply_update`; SCAFFOLD's ``c_i``
        stay with their clients. ``replies`` give the clients' metrics (the within-clip bits).

        Under distributed noise the sum already carries one noise share per reply (each of std
        :func:`noise_share_std` at the round's secure-aggregation ``threshold``, which sizes them) and the
        server adds none.
        """
        if self.dp_global is None:
            return None
        return self._release([join_update(total)], {}, [m for m in replies if not m.has_error()], 0, threshold)

    def _release(
        self,
        updates: list[Arrays],
        per_partition: dict[int, dict[str, Arrays]],
        ok: list[Message],
        over: int,
        threshold: int | None = None,
    ) -> ArrayRecord:
        """Noise the fixed-weight mean of ``updates`` (unless the clients did), step the strategy on it, and
        adapt the clip norm.
        """
        assert self.dp_global is not None
        global_, d, c = self.dp_global, self.dp, self.clip_norm
        like = join_update({ARRAYS_KEY: global_, **{k: global_ for k in self.reply_arrays}})
        mean = fixed_weight_mean(updates, d.expected_clients, like)
        if d.distributed:  # the clients' shares are in the sum already: the server draws nothing
            if threshold is None:
                raise RuntimeError("privacy.noise=distributed needs secure aggregation: set privacy.secagg=true")
            share = noise_share_std(d.noise_multiplier, c, threshold, d.noise_colluders)
            std, noised = math.sqrt(len(ok)) * share / d.expected_clients, split_update(mean)
        else:
            std = noise_std(d.update_multiplier, c, d.expected_clients)
            noised = split_update(add_gaussian_noise(mean, std, self.rng))
        new = self.step_from_mean(global_, noised, d.expected_clients, per_partition)
        within = sum(within_clip(m) for m in ok)
        self.dp_metrics = {
            "dp_clip_norm": c,
            "dp_noise_std": std,
            "dp_clip_fraction": (1.0 - within / len(ok)) if ok else 0.0,
            "dp_server_clipped": float(over),
        }
        if d.distributed:
            self.dp_metrics["dp_noise_shares"] = float(len(ok))
        if d.adaptive_clip:
            noise = float(self.rng.normal(0.0, d.clipped_count_std))
            fraction = noised_fraction_within(within, len(ok), d.expected_clients, noise)
            self.clip_norm = adapt_clip_norm(c, fraction, d.target_quantile, d.clip_lr)
        return to_record({k: new[k].astype(global_[k].dtype) for k in global_})

    def reply_update(self, msg: Message, global_: Arrays) -> dict[str, Arrays]:
        """A reply's update by part: the adapter delta from the global, and the strategy's extra deltas."""
        trained = from_record(msg.content[ARRAYS_KEY])
        parts = {ARRAYS_KEY: {k: trained[k].astype(np.float64) - global_[k].astype(np.float64) for k in global_}}
        parts.update({k: from_record(msg.content[k]) for k in self.reply_arrays})
        return parts

    def state_dict(self) -> dict[str, Any]:
        state = dict(super().state_dict())
        state["dp-clip-norm"] = {"value": np.array([self.clip_norm])}  # a Python float: float64
        state["dp-sampling-key"] = {"value": np.frombuffer(self.sampling_key, dtype=np.uint8).copy()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("dp-clip-norm", None)
        if saved is not None:
            self.clip_norm = float(saved["value"][0])
        key = state.pop("dp-sampling-key", None)
        if key is not None:  # a resumed run draws the same secret sample
            self.sampling_key = np.asarray(key["value"], dtype=np.uint8).tobytes()
        super().load_state_dict(state)


def with_dp(cls: type) -> type:
    """``cls`` with the DP round (instantiate with ``dp=DPParams(...)``, optionally ``accounting=...``).

    Raises a ValueError naming the strategy and the fix for a class that averages nothing or pools data.
    """
    if not issubclass(cls, FedAvgLoRA) or not getattr(cls, "averages", True) or getattr(cls, "mode", "") != "federated":
        raise ValueError(
            f"privacy.dp=true with {cls.__name__}: DP-FedAvg noises the mean of the clients' updates, and this "
            f"strategy averages none (local-only) or pools the data (central); choose a federated strategy "
            f"(fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi, scaffold) or set privacy.dp=false"
        )
    return type(f"DP{cls.__name__}", (DPStrategy, cls), {"__doc__": f"{cls.__name__} under DP-FedAvg."})

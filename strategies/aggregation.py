"""Pure aggregation math shared by the strategies, over named numpy arrays.

Every function takes and returns ``dict[str, np.ndarray]`` (plus optimizer state)
and has no Flower dependency, so it is tested with small hand-computed arrays.

Where these functions differ from the papers, from Flower's strategies or from OpenFedLLM
is listed once, in ``docs/strategies.md``; tests check each difference against Flower's own
strategies on the same inputs (``tests/unit/strategies/test_flower_parity.py``).
"""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def weighted_mean(updates: list[Arrays], weights: list[float]) -> Arrays:
    """``sum_k w_k x_k / sum_k w_k`` per array name."""
    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    return {k: sum(w * u[k] for u, w in zip(updates, weights, strict=True)) / total for k in updates[0]}


def delta(new: Arrays, old: Arrays) -> Arrays:
    """``new - old`` per array name (a pseudo-gradient when ``new`` is the clients' mean)."""
    return {k: new[k] - old[k] for k in old}


def momentum(m: Arrays | None, d: Arrays, beta_1: float) -> Arrays:
    """First moment: ``d`` on the first round, then ``beta_1 m + (1 - beta_1) d``."""
    if m is None:
        return {k: v.copy() for k, v in d.items()}
    return {k: beta_1 * m[k] + (1 - beta_1) * d[k] for k in d}


def initial_first_moment(like: Arrays, form: str) -> Arrays | None:
    """Start of the first moment: zeros (``"zero"``), or ``None`` so that :func:`momentum` takes the first delta."""
    return {k: np.zeros_like(v) for k, v in like.items()} if form == "zero" else None


def initial_second_moment(like: Arrays, tau: float) -> Arrays:
    """OpenFedLLM's start value of the second moment: ``tau**2`` everywhere."""
    return {k: np.full_like(v, tau**2) for k, v in like.items()}


def adaptive_step(global_: Arrays, m: Arrays, v: Arrays, eta: float, tau: float) -> Arrays:
    """``x + eta m / (sqrt(v) + tau)``."""
    return {k: global_[k] + eta * m[k] / (np.sqrt(v[k]) + tau) for k in global_}


def fedavgm_step(global_: Arrays, d: Arrays, m: Arrays | None, server_lr: float, beta: float) -> tuple[Arrays, Arrays]:
    """FedAvgM: ``m = momentum(m, d)``, ``x += server_lr m``. Returns (new global, m)."""
    m = momentum(m, d, beta)
    return {k: global_[k] + server_lr * m[k] for k in global_}, m


def fedadagrad_step(global_: Arrays, d: Arrays, v: Arrays, eta: float, tau: float) -> tuple[Arrays, Arrays]:
    """FedAdagrad (no momentum, as in the paper): ``v += d**2``, ``x += eta d / (sqrt(v) + tau)``."""
    v = {k: v[k] + d[k] ** 2 for k in d}
    return adaptive_step(global_, d, v, eta, tau), v


SECOND_MOMENT_FORMS = ("delta", "momentum")


def squared_update(d: Arrays, m: Arrays, form: str) -> Arrays:
    """What the second moment accumulates: ``d**2`` (``"delta"``: Reddi et al. Alg. 2, Flower) or ``m**2``
    (``"momentum"``: OpenFedLLM).
    """
    if form not in SECOND_MOMENT_FORMS:
        raise ValueError(f"second moment form {form!r} must be one of {', '.join(SECOND_MOMENT_FORMS)}")
    source = d if form == "delta" else m
    return {k: source[k] ** 2 for k in d}


def fedyogi_step(
    global_: Arrays,
    d: Arrays,
    m: Arrays | None,
    v: Arrays,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    second_moment: str = "delta",
) -> tuple[Arrays, Arrays, Arrays]:
    """FedYogi: ``v -= (1 - beta_2) s sign(v - s)``, ``s = d**2`` (or ``m**2``). Returns (new global, m, v)."""
    m = momentum(m, d, beta_1)
    s = squared_update(d, m, second_moment)
    v = {k: v[k] - (1 - beta_2) * s[k] * np.sign(v[k] - s[k]) for k in d}
    return adaptive_step(global_, m, v, eta, tau), m, v


def fedadam_step(
    global_: Arrays,
    d: Arrays,
    m: Arrays | None,
    v: Arrays,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    second_moment: str = "delta",
) -> tuple[Arrays, Arrays, Arrays]:
    """FedAdam: ``v = beta_2 v + (1 - beta_2) s``, ``s = d**2`` (or ``m**2``). Returns (new global, m, v)."""
    m = momentum(m, d, beta_1)
    s = squared_update(d, m, second_moment)
    v = {k: beta_2 * v[k] + (1 - beta_2) * s[k] for k in d}
    return adaptive_step(global_, m, v, eta, tau), m, v


def scaffold_server_step(
    global_: Arrays,
    mean_y: Arrays,
    c: Arrays,
    mean_dc: Arrays,
    num_sampled: int,
    num_clients: int,
    server_lr: float = 1.0,
) -> tuple[Arrays, Arrays]:
    """SCAFFOLD's server update: ``x += lr (mean y - x)``, ``c += (|S| / N) mean(delta c_i)``."""
    new = {k: global_[k] + server_lr * (mean_y[k] - global_[k]) for k in global_}
    c = {k: c[k] + (num_sampled / num_clients) * mean_dc[k] for k in c}
    return new, c


def scaffold_commit_controls(c_i: dict[int, Arrays], deltas: dict[int, Arrays]) -> dict[int, Arrays]:
    """Every partition's ``c_i`` after the accepted ``delta c_i`` (by partition id; absent ``c_i`` are zeros)."""
    out = dict(c_i)
    for pid, dc in deltas.items():
        old = c_i.get(pid)
        out[pid] = {k: v.copy() for k, v in dc.items()} if old is None else {k: old[k] + dc[k] for k in dc}
    return out


def scaffold_client_control(c_i: Arrays, mean_grad: Arrays) -> tuple[Arrays, Arrays]:
    """The client's new control variate: the mean of its raw (uncorrected) gradients this round.

    For local SGD this is exactly SCAFFOLD's option II, ``c_i+ = c_i - c + (x - y_i) / (K lr)``
    (substitute ``y_i = x - lr sum_k (g_k + c - c_i)``). Unlike option II it stays in gradient
    units when the local optimizer is Adam, whose steps are normalised: option II then gives
    values ~1/|g| too large and the correction swamps the data gradient.
    Returns ``(c_i+, c_i+ - c_i)``.
    """
    new = {k: v.copy() for k, v in mean_grad.items()}
    return new, delta(new, c_i)

"""Pure math of federated LoRA with a different rank on each client (HetLoRA, FlexLoRA).

Arrays are PEFT's adapter state dicts: for every adapted layer a pair ``<layer>.lora_A.weight``
(``A``, ``r x in``) and ``<layer>.lora_B.weight`` (``B``, ``out x r``). The server's global
adapter has rank ``r_max``; a client of rank ``r_k <= r_max`` trains the first ``r_k`` ranks
of it: ``A[:r_k]`` and ``B[:, :r_k]`` (:func:`slice_rank`).

LoRA's scaling
--------------
PEFT applies ``(lora_alpha / r) B A``. fedllm gives every client the global's scaling
``alpha / r_max`` (a client of rank ``r_k`` is built with ``lora_alpha = alpha r_k / r_max``,
:func:`fedllm_app.model.with_client_rank`), so the factors of every client and of the global
are in the same units and no function here rescales them. Zero-padding then preserves a
client's update exactly: ``pad(B) pad(A) = B A``.

HetLoRA (Cho et al., EMNLP 2024)
--------------------------------
Each client's factors are zero-padded to ``r_max`` (:func:`pad_rank`) and averaged with
weights ``p_k`` summing to 1, factor by factor: ``A = sum_k p_k pad(A_k)``, ``B = sum_k p_k
pad(B_k)`` (:func:`hetlora_aggregate`). The paper's "sparsity-weighted" ``p_k`` is
proportional to the norm of the client's trained LoRA product; here
``s_k = sqrt(sum_layers ||B_k A_k||_F^2)`` over the whole adapter (:func:`hetlora_weights`,
``weighting="norm"``). ``weighting="examples"`` uses the clients' example counts instead
(FedAvg's weights). Ranks above a client's ``r_k`` receive only the higher-rank clients'
contributions, scaled by their (unrenormalised) share ``p_k``, as in the paper. One departure:
ranks that no client of the round holds (every reply's rank is below them, e.g. when the only
rank-``r_max`` client was not sampled or was rejected) keep the previous global's values instead
of becoming zero: a rank whose ``A`` row and ``B`` column are both zero gets no gradient, so it
would never train again. The paper's rank self-pruning on the clients is an option (below).

``average="per_rank"`` (not the paper's; an option) divides each rank by the share of the weights of the
clients that hold it, so a rank is the weighted mean of its holders' values: zero-padding's sum shrinks
the ranks held only by high-rank clients by that share every round (Byun and Lee, 2024, "Towards Federated
Low-Rank Adaptation of Language Models with Rank Heterogeneity", call this dilution), and as both a
rank's ``A`` row and ``B`` column shrink, the rank's product decays to zero and its gradient with it. Ranks
every client holds are the same under both.

HetLoRA's rank self-pruning (Cho et al., EMNLP 2024, section 3, "local training with rank self-pruning")
---------------------------------------------------------------------------------------------------------
Off unless ``hetlora_prune.enabled`` (:class:`PruneParams`). A client training rank ``r`` splits it into a head
of ``k = max(1, floor(decay r))`` ranks (:func:`kept_rank`) and a tail of the last ``r - k`` ranks, and adds
``weight * sum_layers ||B[:, k:r] A[k:r]||_F`` to its local loss, a pull of the tail's product towards zero
(the gradient: :func:`fedllm_app.client.gradient_terms.tail_norm_grads`). After local training it compares the
tail's size ``t = sum_layers ||B[:, k:r] A[k:r]||_F`` (:func:`tail_norm`) with the same quantity of the factors it
was sent at the round's start, ``t_0``; when ``t < threshold t_0`` it prunes the tail (:func:`pruned_rank`): its
rank becomes ``k``, and from the next round on the server sends, and the client sends back, ``k`` ranks. A
tail that started at zero (``t_0 = 0``, LoRA's zero ``B`` before the first aggregation) is never pruned; a client
of rank 1 has no tail. What fedllm fixes where the paper's description leaves it open: the tail's size is the
sum over the adapted layers of each layer's Frobenius norm (the regulariser's own quantity), one rank for the
whole adapter, and ``threshold`` (1 = the paper's "smaller than before") as a knob.

HetLoRA with a frozen tail (fedllm's experiment, not the paper's; ``hetlora_tail=frozen``)
------------------------------------------------------------------------------------------
Each client receives the whole rank-``r_max`` global and trains only its first ``r_k`` ranks, the others held
at the global's values; it sends back its first ``r_k`` ranks. Rank ``i`` of the new global is the global's rank
``i`` plus the weighted mean of the *updates* (client minus global) of the clients that trained it,
``x_i + sum_{k: r_k > i} p_k (x_{k,i} - x_i) / sum_{k: r_k > i} p_k`` for its ``A`` row and its ``B`` column
(:func:`frozen_tail_aggregate`; ``p_k`` as HetLoRA's, renormalised over those clients). A rank no client
trained, or whose trainers all have weight zero, stays as it was. Every client's model then contains the whole
global, so no client re-learns what the ranks it does not train hold: the test of one suspected cause of
HetLoRA's low accuracy (docs/heterogeneous.md). ``hetlora_tail=frozen_sum`` adds ``sum_{k: r_k > i} p_k
(x_{k,i} - x_i)`` instead, without renormalising (HetLoRA's zero-padded sum, of the updates): to first order the
product then moves by the clients' weighted mean product update, ``sum_k p_k (B_k A_k - B A)``, where the
renormalised form can add up more than that when clients of different ranks learn the same change.

FlexLoRA (Bai et al., NeurIPS 2024)
-----------------------------------
The server averages the full-size products weighted by example counts,
``W = sum_k n_k B_k A_k / sum_k n_k`` per layer, and factorises ``W`` by a truncated SVD
``W ~ U_r S_r V_r^T`` at rank ``r_max`` (:func:`flexlora_aggregate`). The singular values are
split evenly between the factors, ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T`` (the split
does not change the product; the even split keeps both factors at equal norm; the choice is
fedllm's). Singular triplets are kept in decreasing order, so the first ``r_k`` ranks of the
global are exactly the rank-``r_k`` truncated SVD of ``W``: by Eckart-Young the best rank-``r_k``
approximation, which is what FlexLoRA gives client ``k``. ``flexlora_average=updates`` (not the
paper's; an option) averages the clients' product *updates* ``B_k A_k - W_{r_k}`` (``W_{r_k}`` what client
``k`` was sent) and adds them to ``W``: averaging the products themselves replaces ``W`` by a mix of its
truncations, which shrinks the part beyond a low-rank client's rank by that client's weight every round.
Ranks beyond the rank of ``W`` (when the
round's ranks sum to less than ``r_max``) get LoRA's own start, a fresh random ``A`` row and a zero
``B`` column: the product is unchanged and the rank can train again. ``W`` is never formed: it is
``[B_1 .. B_K] [A_1; ..; A_K]``, a product of thin factors, whose SVD comes from two QR
decompositions and the SVD of a ``R x R`` core (``R = sum_k r_k``), :func:`low_rank_svd`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.aggregation import Arrays

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
WEIGHTINGS = ("norm", "examples")
AVERAGES = ("zero_padded", "per_rank")
FLEXLORA_AVERAGES = ("products", "updates")
TAILS = ("none", "frozen", "frozen_sum")


def lora_layers(arrays: Arrays) -> list[str]:
    """The adapted layers' name prefixes (``<layer>`` of ``<layer>.lora_A.weight``), sorted.

    Raises a ValueError naming the array when an ``A`` has no ``B`` (or the reverse) or another array is present.
    """
    layers = sorted(k[: -len(A_SUFFIX)] for k in arrays if k.endswith(A_SUFFIX))
    expected = {name for layer in layers for name in (layer + A_SUFFIX, layer + B_SUFFIX)}
    stray = sorted(set(arrays) - expected) or sorted(expected - set(arrays))
    if stray:
        raise ValueError(f"array {stray[0]!r} is not half of a LoRA pair <layer>{A_SUFFIX} / <layer>{B_SUFFIX}")
    return layers


def rank_of(arrays: Arrays) -> int:
    """The LoRA rank of an adapter (the rows of its ``A`` matrices; they must all agree)."""
    ranks = {arrays[layer + A_SUFFIX].shape[0] for layer in lora_layers(arrays)}
    if len(ranks) != 1:
        raise ValueError(f"the adapter's layers have different ranks {sorted(ranks)}; one rank per adapter")
    return ranks.pop()


def slice_rank(global_: Arrays, rank: int) -> Arrays:
    """The first ``rank`` ranks of an adapter: ``A[:rank]`` and ``B[:, :rank]`` of every layer."""
    r_max = rank_of(global_)
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank {rank} must be between 1 and the global adapter's rank {r_max}")
    out = {}
    for layer in lora_layers(global_):
        out[layer + A_SUFFIX] = global_[layer + A_SUFFIX][:rank].copy()
        out[layer + B_SUFFIX] = global_[layer + B_SUFFIX][:, :rank].copy()
    return out


def pad_rank(client: Arrays, r_max: int) -> Arrays:
    """A client's adapter zero-padded to rank ``r_max``: ``A`` gets zero rows, ``B`` zero columns."""
    rank = rank_of(client)
    if rank > r_max:
        raise ValueError(f"the client's rank {rank} is above r_max={r_max}")
    out = {}
    for layer in lora_layers(client):
        a, b = client[layer + A_SUFFIX], client[layer + B_SUFFIX]
        out[layer + A_SUFFIX] = np.pad(a, ((0, r_max - rank), (0, 0)))
        out[layer + B_SUFFIX] = np.pad(b, ((0, 0), (0, r_max - rank)))
    return out


def product_norm(client: Arrays) -> float:
    """``sqrt(sum over layers of ||B A||_F^2)``: the size of the client's whole LoRA update."""
    total = 0.0
    for layer in lora_layers(client):  # ||B A||_F^2 = sum((B^T B) * (A A^T)), without forming B A
        a, b = client[layer + A_SUFFIX].astype(np.float64), client[layer + B_SUFFIX].astype(np.float64)
        total += float(np.sum((b.T @ b) * (a @ a.T)))
    return max(total, 0.0) ** 0.5


def hetlora_weights(clients: list[Arrays], num_examples: list[float], weighting: str = "norm") -> list[float]:
    """HetLoRA's aggregation weights ``p_k`` (they sum to 1).

    ``"norm"``: ``p_k = s_k / sum_j s_j`` with ``s_k`` :func:`product_norm` (the paper's sparsity
    weighting; equal weights if every product is zero, as at the start). ``"examples"``: ``p_k = n_k / sum_j n_j``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {', '.join(WEIGHTINGS)}")
    sizes = [product_norm(c) for c in clients] if weighting == "norm" else [float(n) for n in num_examples]
    total = sum(sizes)
    if total <= 0:
        return [1.0 / len(clients)] * len(clients)
    return [s / total for s in sizes]


def hetlora_aggregate(
    clients: list[Arrays],
    weights: list[float],
    r_max: int,
    previous: Arrays | None = None,
    average: str = "zero_padded",
) -> Arrays:
    """``sum_k p_k pad(x_k)`` for every factor, at rank ``r_max`` (weights as :func:`hetlora_weights` gives).

    ``average="per_rank"``: rank ``i`` is divided by ``sum_{k: r_k > i} p_k``, the weights of the clients
    holding it. With ``previous`` (the global the clients started from), the ranks above every client's
    rank keep its values.
    """
    if not clients:
        raise ValueError("no client adapters to aggregate")
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} must be one of {', '.join(AVERAGES)}")
    padded = [pad_rank(c, r_max) for c in clients]
    out = {k: sum(w * p[k] for p, w in zip(padded, weights, strict=True)) for k in padded[0]}
    if average == "per_rank":
        _divide_by_holders_share(out, [rank_of(c) for c in clients], weights, r_max)
    held = max(rank_of(c) for c in clients)
    if previous is not None and held < r_max:
        for layer in lora_layers(out):
            out[layer + A_SUFFIX][held:] = previous[layer + A_SUFFIX][held:]
            out[layer + B_SUFFIX][:, held:] = previous[layer + B_SUFFIX][:, held:]
    return out


def frozen_tail_aggregate(
    global_: Arrays, clients: list[Arrays], weights: list[float], renormalise: bool = True
) -> Arrays:
    """The new rank-``r_max`` global from clients that each trained the first ``r_k`` ranks of ``global_``.

    Rank ``i`` (``A`` row, ``B`` column) is ``global_``'s plus ``sum_{k: r_k > i} w_k (client_k - global_)``
    divided by ``sum_{k: r_k > i} w_k`` (not divided with ``renormalise=False``: ``frozen_sum``); a rank no client
    (of positive weight) trained keeps ``global_``'s values.
    ``clients[k]`` holds ranks ``0..r_k-1`` (its own rank); ``weights`` as :func:`hetlora_weights` gives.
    """
    if not clients:
        raise ValueError("no client adapters to aggregate")
    r_max, ranks = rank_of(global_), [rank_of(c) for c in clients]
    if max(ranks) > r_max:
        raise ValueError(f"a client's rank {max(ranks)} is above the global adapter's rank {r_max}")
    share = np.array([sum(w for w, r in zip(weights, ranks, strict=True) if r > i) for i in range(r_max)])
    scale = np.divide(1.0, share, out=np.zeros(r_max), where=share > 0) if renormalise else np.ones(r_max)
    out = {}
    for layer in lora_layers(global_):
        a, b = global_[layer + A_SUFFIX].astype(np.float64), global_[layer + B_SUFFIX].astype(np.float64)
        step_a, step_b = np.zeros_like(a), np.zeros_like(b)
        for client, w, r in zip(clients, weights, ranks, strict=True):
            step_a[:r] += w * (client[layer + A_SUFFIX] - a[:r])
            step_b[:, :r] += w * (client[layer + B_SUFFIX] - b[:, :r])
        dtype = global_[layer + A_SUFFIX].dtype
        out[layer + A_SUFFIX] = (a + scale[:, None] * step_a).astype(dtype)
        out[layer + B_SUFFIX] = (b + scale[None, :] * step_b).astype(dtype)
    return out


def _divide_by_holders_share(out: Arrays, ranks: list[int], weights: list[float], r_max: int) -> None:
    """Rank ``i`` of every factor in ``out`` divided by the weight share of the clients of rank above ``i``."""
    share = np.array([sum(w for w, r in zip(weights, ranks, strict=True) if r > i) for i in range(r_max)])
    scale = np.divide(1.0, share, out=np.zeros(r_max), where=share > 0)  # a rank no one holds stays zero here
    for layer in lora_layers(out):
        out[layer + A_SUFFIX] = out[layer + A_SUFFIX] * scale[:, None].astype(out[layer + A_SUFFIX].dtype)
        out[layer + B_SUFFIX] = out[layer + B_SUFFIX] * scale[None, :].astype(out[layer + B_SUFFIX].dtype)


def low_rank_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD ``U, S, Vt`` of ``b @ a`` (``b``: ``out x R``, ``a``: ``R x in``) without forming it.

    ``b = Q_b R_b`` and ``a^T = Q_a R_a`` (QR); ``b a = Q_b (R_b R_a^T) Q_a^T``; the SVD of the
    ``R x R`` core ``U_c S V_c^T`` gives ``U = Q_b U_c``, ``Vt = V_c^T Q_a^T``. Cost ``O((out + in) R^2)``.
    """
    q_b, r_b = np.linalg.qr(b.astype(np.float64))
    q_a, r_a = np.linalg.qr(a.T.astype(np.float64))
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T)
    return q_b @ u_c, s, vt_c @ q_a.T


def flexlora_aggregate(
    clients: list[Arrays],
    num_examples: list[float],
    r_max: int,
    rng: np.random.Generator | None = None,
    previous: Arrays | None = None,
) -> Arrays:
    """FlexLoRA: the rank-``r_max`` truncated SVD of ``sum_k n_k B_k A_k / sum_k n_k``, per layer.

    With ``previous`` (the rank-``r_max`` global the clients were sent; ``flexlora_average=updates``) the
    SVD is of ``W + sum_k p_k (B_k A_k - B[:, :r_k] A[:r_k])`` instead, ``W = B A`` the previous global and
    ``p_k = n_k / sum_j n_j``: the mean of the clients' product updates added to the global, so the part of
    ``W`` a low-rank client never received is kept instead of being averaged with its truncation.

    Returns ``B = U S^(1/2)``, ``A = S^(1/2) V^T`` in decreasing singular-value order, in the clients'
    dtype. Ranks beyond the SVD's (the clients' ranks sum to less than ``r_max``) have a zero ``B``
    column and, with ``rng``, an ``A`` row drawn as PEFT starts LoRA (``U(-1/sqrt(in), 1/sqrt(in))``),
    else a zero one.
    """
    if not clients:
        raise ValueError("no client adapters to aggregate")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError(f"example counts must sum to a positive number, got {num_examples}")
    out: Arrays = {}
    dtype = clients[0][lora_layers(clients[0])[0] + A_SUFFIX].dtype
    weights = [n / total for n in num_examples]
    for layer in lora_layers(clients[0]):
        b_parts = [w * c[layer + B_SUFFIX] for c, w in zip(clients, weights, strict=True)]
        a_parts = [c[layer + A_SUFFIX] for c in clients]
        if previous is not None:  # + W - sum_k p_k W[:r_k]: each client's update, not its product
            b_prev, a_prev = previous[layer + B_SUFFIX], previous[layer + A_SUFFIX]
            ranks = [c[layer + A_SUFFIX].shape[0] for c in clients]
            b_parts += [b_prev] + [-w * b_prev[:, :r] for w, r in zip(weights, ranks, strict=True)]
            a_parts += [a_prev] + [a_prev[:r] for r in ranks]
        b, a = np.concatenate(b_parts, 1), np.concatenate(a_parts, 0)
        u, s, vt = low_rank_svd(b, a)
        keep = min(r_max, s.size)
        root = np.sqrt(s[:keep])
        new_b, new_a = np.zeros((b.shape[0], r_max)), np.zeros((r_max, a.shape[1]))
        new_b[:, :keep], new_a[:keep] = u[:, :keep] * root, root[:, None] * vt[:keep]
        if rng is not None and keep < r_max:
            bound = 1.0 / np.sqrt(a.shape[1])
            new_a[keep:] = rng.uniform(-bound, bound, size=(r_max - keep, a.shape[1]))
        out[layer + A_SUFFIX], out[layer + B_SUFFIX] = new_a.astype(dtype), new_b.astype(dtype)
    return out


@dataclass(frozen=True)
class PruneParams:
    """HetLoRA's rank self-pruning on the clients (module docstring); the config's ``hetlora_prune`` section.

    Attributes
    ----------
    enabled : bool
        Prune at all (only with ``lora_aggregation=hetlora``). Off: clients keep their rank for the whole run.
    decay : float
        ``gamma`` in (0, 1): a client of rank ``r`` keeps ``max(1, floor(decay r))`` ranks when it prunes; the
        ranks after those are the tail the regulariser acts on.
    weight : float
        ``lambda`` >= 0: the regulariser ``weight * sum_layers ||B_tail A_tail||_F`` added to the local loss.
    threshold : float
        > 0: the tail is pruned when its size after local training is below ``threshold`` times its size in
        the factors the client was sent (1: the paper's "smaller than before the round").
    """

    enabled: bool = False
    decay: float = 0.9
    weight: float = 0.01
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"hetlora_prune.decay={self.decay} must be in (0, 1); e.g. hetlora_prune.decay=0.9")
        if not self.weight >= 0:
            raise ValueError(f"hetlora_prune.weight={self.weight} must be >= 0; e.g. hetlora_prune.weight=0.01")
        if not self.threshold > 0:
            raise ValueError(
                f"hetlora_prune.threshold={self.threshold} must be positive; e.g. hetlora_prune.threshold=1.0"
            )

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> PruneParams:
        """From the config's ``hetlora_prune`` mapping (None or missing keys: the defaults)."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"enabled", "decay", "weight", "threshold"})
        if unknown:
            raise ValueError(
                f"hetlora_prune has unknown keys {unknown}; its keys are enabled, decay, weight, threshold"
            )
        enabled = section.pop("enabled", False)
        if not isinstance(enabled, bool):
            raise ValueError(f"hetlora_prune.enabled={enabled!r} must be true or false")
        return cls(enabled=enabled, **{k: float(v) for k, v in section.items()})


def kept_rank(rank: int, decay: float) -> int:
    """The ranks a client of rank ``rank`` keeps when it prunes: ``max(1, floor(decay rank))`` (``rank`` if 1)."""
    if rank < 1:
        raise ValueError(f"rank {rank} must be at least 1")
    return max(1, math.floor(decay * rank + 1e-9))  # 1e-9: 0.5 * 4 is 2, not 1.9999...


def tail_norm(arrays: Arrays, keep: int) -> float:
    """``sum over layers of ||B[:, keep:] A[keep:]||_F``: the size of the adapter's ranks after the first ``keep``."""
    total = 0.0
    for layer in lora_layers(arrays):
        a = arrays[layer + A_SUFFIX][keep:].astype(np.float64)
        b = arrays[layer + B_SUFFIX][:, keep:].astype(np.float64)
        total += max(float(np.sum((b.T @ b) * (a @ a.T))), 0.0) ** 0.5
    return total


def pruned_rank(rank: int, before: float, after: float, params: PruneParams) -> int:
    """The client's rank after a round: :func:`kept_rank` when the tail's size fell below ``threshold`` times its
    size at the round's start (``after < threshold before``), else ``rank``.
    """
    keep = kept_rank(rank, params.decay)
    if not params.enabled or keep >= rank:
        return rank
    return keep if after < params.threshold * before else rank


def zero_tail(arrays: Arrays, keep: int) -> Arrays:
    """A copy of ``arrays`` whose ranks after the first ``keep`` are zero (``A`` rows and ``B`` columns)."""
    out = {k: v.copy() for k, v in arrays.items()}
    for layer in lora_layers(out):
        out[layer + A_SUFFIX][keep:] = 0
        out[layer + B_SUFFIX][:, keep:] = 0
    return out

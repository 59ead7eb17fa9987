"""Clients of different LoRA ranks under a FedAvg-based strategy (HetLoRA, FlexLoRA).

:func:`with_lora_ranks` turns a strategy class into one whose server keeps a global adapter of
rank ``r_max`` and sends each client only the first ``r_k`` ranks of it; the math is in
:mod:`strategies.hetero_rank`. The combined class places :class:`HeteroRank` just above
:class:`~strategies.fedavg.FedAvgLoRA` in the method order, so the strategy's own steps wrap it:
FedProx adds its ``proximal-mu``; FedAvgM and the FedOpt family apply their server step to the
rank-``r_max`` aggregate, as they do to FedAvg's mean.

Which strategies compose
------------------------
- FedAvg, FedProx, local-only: with both methods (FedProx's proximal term acts on the client's own
  ranks, anchored at the slice it received).
- FedAvgM, FedAdagrad, FedAdam, FedYogi: with ``hetlora`` (the zero-padded factor average is in the
  same coordinates every round, so a delta of factors means what it means for FedAvg). Refused with
  ``flexlora``: its global factors are a fresh SVD each round, defined only up to the sign (and, for
  equal singular values, the rotation) of each rank, so the difference of two rounds' factors is
  not an update and a momentum over it is meaningless.
- SCAFFOLD: refused; its control variates have the global's shapes and a client of rank ``r_k``
  would correct with a slice of the others' gradients, which SCAFFOLD's analysis does not cover.
- The central baseline: refused; it pools every client's data on one node, so there is no
  per-client rank to honour.

Client contract
---------------
FedAvg's, with ``arrays`` of the client's own rank. Before a node's first round the server sends it
a ``query.lora_rank`` message; the client replies with a MetricRecord ``metrics`` holding
``lora-rank`` (its node config's ``lora-rank``, else its entry of ``model.lora.client_ranks``).
The client builds its adapter with that rank and ``lora_alpha = alpha r_k / r_max`` (the global's
scaling, see :mod:`strategies.hetero_rank`), and replies with arrays of its own rank.

Under HetLoRA's rank self-pruning (``prune``), a reply's metrics hold ``lora-rank``, the client's rank after
the round (at most the rank it was sent; the reply checks reject more). The reply keeps the shapes it was sent,
its pruned ranks zero; the server cuts it to the new rank before aggregating (so the ranks it dropped count as
not held, exactly as if it had sent only the ranks it kept), and from then on sends that node the new rank.
The server is the one record of a client's current rank: a rejected reply changes nothing, and the pruned ranks
are kept by partition in :meth:`HeteroRank.rank_state`, saved for a resumed run.

Under HetLoRA's frozen tail (``tail="frozen"`` or ``"frozen_sum"``, :mod:`strategies.hetero_rank`),
``arrays`` is the whole rank-``r_max`` global and the train config holds ``lora-train-rank`` (``r_k``): the
client loads the global into an adapter of rank ``r_max`` (the global's ``lora_alpha``), trains only its first
``r_k`` ranks (the others' gradients zeroed) and replies with those ``r_k`` ranks; the reply checks expect that
slice's shapes (:meth:`HeteroRank.reply_base`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.central import Central
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, FedAvgLoRA
from strategies.fedopt import ServerOptimizer
from strategies.hetero_rank import (
    AVERAGES,
    FLEXLORA_AVERAGES,
    TAILS,
    WEIGHTINGS,
    flexlora_aggregate,
    frozen_tail_aggregate,
    hetlora_aggregate,
    hetlora_weights,
    pad_rank,
    rank_of,
)
from strategies.hetero_rank import slice_rank as slice_arrays
from strategies.local import LocalOnly
from strategies.records import from_record, is_integer, to_record
from strategies.scaffold import Scaffold

log = logging.getLogger("fedllm")

AGGREGATIONS = ("homogeneous", "hetlora", "flexlora")
RANK_KEY = "lora-rank"
RANK_QUERY = "query.lora_rank"  # Flower: the action after the dot must be an identifier
TRAIN_RANK_KEY = "lora-train-rank"  # hetlora_tail=frozen: the train config's ranks the client trains and sends
PRUNED_STATE_KEY = "pruned-lora-ranks"  # the strategy state's key: partition id -> pruned rank


def check_rank(rank: int, r_max: int, who: str) -> None:
    """Raise a ValueError naming ``who`` unless ``1 <= rank <= r_max``."""
    if not 1 <= rank <= r_max:
        raise ValueError(
            f"{who} has LoRA rank {rank}, outside 1..r_max={r_max} (model.lora.r, the global adapter's rank); "
            f"give it a rank of at most {r_max} or raise model.lora.r"
        )


@dataclass(frozen=True)
class HeteroRankParams:
    """How clients of different ranks are combined.

    Attributes
    ----------
    method : str
        ``"hetlora"`` (zero-padded factor average) or ``"flexlora"`` (SVD of the mean product).
    r_max : int
        The global adapter's rank (``model.lora.r``); every client's rank is at most this.
    weighting : str
        HetLoRA's client weights: ``"norm"`` (the paper's, by the size of each client's ``B A``) or
        ``"examples"`` (FedAvg's example counts). FlexLoRA always weights by example counts.
    average : str
        HetLoRA's ranks: ``"zero_padded"`` (the paper's weighted sum of zero-padded factors) or ``"per_rank"``
        (each rank the weighted mean of the clients that hold it); see :mod:`strategies.hetero_rank`.
    flexlora_average : str
        FlexLoRA's mean: ``"products"`` (the paper's: of the clients' ``B_k A_k``) or ``"updates"`` (of their
        changes from what each was sent, added to the global); see :mod:`strategies.hetero_rank`.
    query_timeout : float
        Seconds to wait for a node's answer to the rank query (the server passes ``round_timeout``); a node
        that has not answered is left out of the round and asked again the next.
    prune : bool
        HetLoRA's rank self-pruning (``hetlora_prune.enabled``; hetlora only): a reply's ``lora-rank`` below
        the rank sent lowers that node's rank for the rest of the run (module docstring).
    tail : str
        HetLoRA's ranks beyond a client's own (``hetlora_tail``; hetlora only): ``"none"`` (the paper's: the
        client is sent and trains only its ``r_k`` ranks), ``"frozen"`` (it is sent the whole global and
        trains its first ``r_k`` ranks, the rest held; each rank moves by the mean update of the clients that
        trained it) or ``"frozen_sum"`` (the same clients; each rank moves by their weighted sum of updates,
        not renormalised); :mod:`strategies.hetero_rank`.
    """

    method: str
    r_max: int
    weighting: str = "norm"
    query_timeout: float = 600.0
    average: str = "zero_padded"
    flexlora_average: str = "products"
    prune: bool = False
    tail: str = "none"

    def __post_init__(self) -> None:
        if self.method not in AGGREGATIONS[1:]:
            raise ValueError(f"lora_aggregation={self.method!r} must be one of {', '.join(AGGREGATIONS)}")
        if self.r_max < 1:
            raise ValueError(f"model.lora.r={self.r_max} must be at least 1")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if self.average not in AVERAGES:
            raise ValueError(f"average={self.average!r} must be one of {', '.join(AVERAGES)}")
        if self.flexlora_average not in FLEXLORA_AVERAGES:
            raise ValueError(
                f"flexlora_average={self.flexlora_average!r} must be one of {', '.join(FLEXLORA_AVERAGES)}"
            )
        if self.prune and self.method != "hetlora":
            raise ValueError(
                f"hetlora_prune.enabled=true with lora_aggregation={self.method}: rank self-pruning is HetLoRA's; "
                f"set lora_aggregation=hetlora or hetlora_prune.enabled=false"
            )
        self._check_tail()

    def _check_tail(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"hetlora_tail={self.tail!r} must be one of {', '.join(TAILS)}")
        if self.tail == "none":
            return
        for bad, what, fix in (
            (self.method != "hetlora", f"lora_aggregation={self.method}", "lora_aggregation=hetlora"),
            (self.prune, "hetlora_prune.enabled=true", "hetlora_prune.enabled=false"),
            (self.average != "zero_padded", f"hetlora_average={self.average}", "hetlora_average=zero_padded"),
        ):
            if bad:
                raise ValueError(
                    f"hetlora_tail={self.tail} cannot run with {what}: the frozen tail is its own way to send, train "
                    f"and aggregate HetLoRA's ranks; set {fix} or hetlora_tail=none"
                )


class HeteroRank(FedAvgLoRA):
    """Sends each node its own rank's slice of the global; aggregates its replies back to ``r_max``."""

    def __init__(self, *, hetero: HeteroRankParams, **kwargs: Any) -> None:
        self.hetero = hetero
        self.node_ranks: dict[int, int] = {}
        self.refused: set[int] = set()  # nodes whose rank answer was an error or out of range: never sampled
        self.pruned: dict[int, int] = {}  # partition id -> its rank after self-pruning (prune only)
        self.sent: dict | None = None  # the global adapter of the round (rank r_max)
        super().__init__(**kwargs)

    def rank_state(self) -> dict[str, Any]:
        """The pruned ranks by partition, as the run's saved state holds them (nothing without pruning)."""
        if not self.hetero.prune:
            return {}
        return {PRUNED_STATE_KEY: {str(pid): np.array(rank) for pid, rank in sorted(self.pruned.items())}}

    def load_rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Take the pruned ranks out of a saved state; return the rest (the strategy's own state)."""
        state = dict(state)
        saved = state.pop(PRUNED_STATE_KEY, None) or {}
        self.pruned = {int(pid): int(rank) for pid, rank in saved.items()}
        return state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.rank_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(self.load_rank_state(state))

    def describe(self) -> str:
        return f"{super().describe()}; LoRA ranks per client, {self.hetero.method} up to r_max={self.hetero.r_max}"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.learn_ranks(grid, [m.metadata.dst_node_id for m in messages])
        global_ = self.sent = from_record(arrays)
        out = []
        for msg in messages:
            rank = self.node_ranks.get(msg.metadata.dst_node_id)
            if rank is None:
                continue  # no answer to the rank query: left out of the round (logged by learn_ranks)
            content = RecordDict(dict(msg.content.items()))  # FedAvg's messages share one RecordDict
            if self.hetero.tail != "none":  # the whole global; the client trains and sends its first `rank`
                content[CONFIG_KEY] = ConfigRecord({**dict(content[CONFIG_KEY].items()), TRAIN_RANK_KEY: rank})
            elif rank != self.hetero.r_max:
                content[ARRAYS_KEY] = to_record(slice_arrays(global_, rank))
            msg.content = content
            out.append(msg)
        return out

    def reply_base(self, node: int, sent: ArrayRecord) -> ArrayRecord:
        """What a node's reply adapter is checked and measured against: the adapter it was sent, cut to its
        own rank under the frozen tail (it is sent ``r_max`` ranks and sends back its ``r_k``).
        """
        if self.hetero.tail == "none" or node not in self.node_ranks:
            return sent
        return to_record(slice_arrays(from_record(sent), self.node_ranks[node]))

    def learn_ranks(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask the nodes whose rank is not known yet. A node that answers with an error, no integer rank or one
        outside ``1..r_max`` is logged with the fix and left out of every round (one node's answer must not end
        everyone's run); one that does not answer within ``query_timeout`` is left out of this round only.
        """
        unknown = [n for n in node_ids if n not in self.node_ranks and n not in self.refused]
        if not unknown:
            return
        queries = [
            Message(
                RecordDict({CONFIG_KEY: ConfigRecord({"r-max": self.hetero.r_max})}),
                dst_node_id=n,
                message_type=RANK_QUERY,
            )
            for n in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=self.hetero.query_timeout):
            node = reply.metadata.src_node_id
            try:
                rank = self._answered_rank(reply)
            except ValueError as err:
                self.refused.add(node)
                log.error("%s; node %s is not sampled in this run", err, node)
                continue
            pid = self.partition_of.get(node)
            self.node_ranks[node] = min(rank, self.pruned.get(pid, rank)) if self.hetero.prune else rank
        silent = sorted(set(unknown) - set(self.node_ranks) - self.refused)
        if silent:
            log.warning("nodes %s did not say their LoRA rank within %s s", silent, self.hetero.query_timeout)

    def _answered_rank(self, reply: Message) -> int:
        """A node's answer to the rank query, or a ValueError that names the node, its answer and the fix."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise ValueError(f"node {node} could not say its LoRA rank: {reply.error.reason}")
        metrics = reply.content.get(METRICS_KEY)
        rank = None if metrics is None else metrics.get(RANK_KEY)
        if not is_integer(rank):
            raise ValueError(
                f"node {node} answered the LoRA rank query with {rank!r}, not an integer; give it a whole "
                f"number as its lora-rank node config"
            )
        check_rank(rank, self.hetero.r_max, f"node {node}")
        return rank

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        clients = [self.reply_adapter(m) for m in valid]
        n = [float(m.content[METRICS_KEY][self.weighted_by_key]) for m in valid]  # the server's weight
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return to_record(self.combine(clients, n, server_round)), metrics

    def reply_adapter(self, reply: Message) -> dict:
        """A reply's adapter; under self-pruning cut to the rank the client says it keeps, which the node is
        sent from the next round on (a reply the checks accepted: its ``lora-rank`` is within what it was sent).
        """
        arrays = from_record(reply.content[ARRAYS_KEY])
        if not self.hetero.prune or RANK_KEY not in reply.content[METRICS_KEY]:
            return arrays
        node, sent, rank = reply.metadata.src_node_id, rank_of(arrays), int(reply.content[METRICS_KEY][RANK_KEY])
        if rank >= sent:
            return arrays
        pid = self.partition_of.get(node)
        log.info("node %s (partition %s) pruned its LoRA rank %d -> %d", node, pid, sent, rank)
        self.node_ranks[node] = rank
        if pid is not None:
            self.pruned[pid] = rank
        return slice_arrays(arrays, rank)

    def combine(self, clients: list[dict], num_examples: list[float], server_round: int = 1) -> dict:
        """The rank-``r_max`` global from the clients' adapters of their own ranks (ranks no client holds:
        see :mod:`strategies.hetero_rank`).
        """
        p = self.hetero
        if p.method == "flexlora":
            previous = self.sent if p.flexlora_average == "updates" else None
            return flexlora_aggregate(
                clients, num_examples, p.r_max, np.random.default_rng(server_round), previous=previous
            )
        weights = hetlora_weights(clients, num_examples, p.weighting)
        if p.tail != "none":
            return frozen_tail_aggregate(self.sent, clients, weights, renormalise=p.tail == "frozen")
        return hetlora_aggregate(clients, weights, p.r_max, previous=self.sent, average=p.average)


class HeteroLocalOnly(LocalOnly, HeteroRank):
    """The local-only baseline with clients of different ranks.

    Each client's adapter is kept zero-padded to ``r_max``: the same function of the input, since
    every rank shares the global's scaling, so the server evaluates it with the global's model.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = super().aggregate_train(server_round, replies)
        r_max = self.hetero.r_max
        self.client_arrays = {pid: to_record(pad_rank(from_record(a), r_max)) for pid, a in self.client_arrays.items()}
        return out


def with_lora_ranks(cls: type, method: str) -> type:
    """``cls`` combined with :class:`HeteroRank` (instantiate it with ``hetero=HeteroRankParams(...)``).

    Raises a ValueError naming the strategy, the method and the fix for the combinations that
    are meaningless (module docstring).
    """
    name = cls.__name__
    fix = "use lora_aggregation=homogeneous or another strategy"
    if issubclass(cls, Scaffold):
        raise ValueError(
            f"{name} cannot run with lora_aggregation={method}: its control variates would have to be sliced "
            f"and padded across ranks, which SCAFFOLD's correction does not define; {fix} (fedavg, fedprox, "
            f"fedavgm, fedadam, fedyogi, fedadagrad)"
        )
    if issubclass(cls, Central):
        raise ValueError(
            f"{name} cannot run with lora_aggregation={method}: it trains one adapter on the pooled data of "
            f"every client, so no client rank applies; {fix}"
        )
    if issubclass(cls, ServerOptimizer) and method == "flexlora":
        raise ValueError(
            f"{name} cannot run with lora_aggregation=flexlora: each round's SVD factors are defined only up to "
            f"sign and rotation, so their difference is no update for a server optimiser; use "
            f"lora_aggregation=hetlora with {name}, or flexlora with fedavg or fedprox"
        )
    if issubclass(cls, LocalOnly):
        return HeteroLocalOnly
    if cls is FedAvgLoRA:
        return HeteroRank
    return type(
        f"{name}WithLoRARanks",
        (cls, HeteroRank),
        {
            "__doc__": f"{name} with clients of different ranks.",
            # cls's own state (a server optimiser's moments, which ends the super() chain) and the pruned ranks
            "state_dict": lambda self: {**cls.state_dict(self), **self.rank_state()},
            "load_state_dict": lambda self, state: cls.load_state_dict(self, self.load_rank_state(state)),
        },
    )

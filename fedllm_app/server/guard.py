"""What the server decides about a round's sound replies, so that no single client decides the aggregate.

After :mod:`fedllm_app.server.reply_checks` has validated each reply:

- **weights**: each reply is weighted by its client's data size (McMahan et al.; OpenFedLLM), which
  the server knows or bounds (``robust.weights``): ``plan`` takes the server's own partition sizes
  (a reply reporting another ``data-size`` is rejected); ``bounded`` (the default) takes the plan's
  size when the reply agrees with it, else the size the partition reported at its first accepted reply,
  pinned for the run and capped at ``robust.max_weight`` rows (default: the plan's largest partition);
  ``uniform`` weighs every reply 1. The per-round ``num-examples`` stays a metric only.
- **update bound**: an update whose L2 distance from the global adapter (SCAFFOLD's ``c-delta``: its
  norm) exceeds ``robust.max_update_norm``, or ``robust.norm_factor`` times the median of the round's
  other replies, is clipped back onto the bound or rejected (``robust.on_exceed``), and logged.

The weight is written into the reply's metrics under :data:`strategies.fedavg.WEIGHT_KEY`, the key
the strategies average by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedllm_app.config import ConfigError
from fedllm_app.server.reply_checks import PartitionBook
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, PARTITION_KEY, WEIGHT_KEY
from strategies.records import from_record, to_record

log = logging.getLogger("fedllm")

WEIGHT_MODES = ("plan", "bounded", "uniform")
ON_EXCEED = ("clip", "reject")


@dataclass(frozen=True)
class GuardParams:
    """The ``robust`` config section (``conf/config.yaml``).

    Attributes
    ----------
    weights : str
        ``plan``, ``bounded`` or ``uniform`` (see the module docstring).
    max_weight : int or None
        Cap on a reported data size under ``bounded``; None: the plan's largest partition.
    max_update_norm : float or None
        Absolute bound on an update's L2 distance from the global adapter; None: none.
    norm_factor : float or None
        Bound as a multiple of the median distance of the round's other replies; None: none.
    on_exceed : str
        ``clip`` (scale the update back onto the bound) or ``reject``.
    """

    weights: str = "bounded"
    max_weight: int | None = None
    max_update_norm: float | None = None
    norm_factor: float | None = 10.0
    on_exceed: str = "clip"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ConfigError(f"robust.weights={self.weights!r} must be one of {', '.join(WEIGHT_MODES)}")
        if self.on_exceed not in ON_EXCEED:
            raise ConfigError(f"robust.on_exceed={self.on_exceed!r} must be one of {', '.join(ON_EXCEED)}")
        for name in ("max_weight", "max_update_norm", "norm_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"robust.{name}={value!r} must be a positive number or null")

    @classmethod
    def from_config(cls, section: Any) -> GuardParams:
        return cls(**dict(section)) if section is not None else cls()


@dataclass
class ReplyGuard:
    """Per-run judge of weights and update sizes; ``plan`` maps partition id -> rows (the server's split)."""

    params: GuardParams = field(default_factory=GuardParams)
    plan: dict[int, int] | None = None
    book: PartitionBook = field(default_factory=PartitionBook)
    pinned: dict[int, int] = field(default_factory=dict)

    def judge(
        self,
        replies: list[Message],
        global_arrays: ArrayRecord,
        extra: tuple[str, ...],
        bound: bool = True,
        sent: dict[int, ArrayRecord] | None = None,
    ) -> tuple[list[Message], list[dict[str, Any]], list[dict[str, Any]]]:
        """(kept replies with their weights set, rejected, clipped); error replies pass through untouched.

        ``bound=False`` (a strategy that averages nothing, e.g. the local-only baseline) skips the update bound.
        An update is measured from what its node was sent (``sent``: node -> adapter; a slice of the global
        for a client of lower LoRA rank), else from ``global_arrays``.
        """
        ok = [m for m in replies if not m.has_error()]
        rejected: list[dict[str, Any]] = []
        weighted = []
        for msg in ok:
            weight, problem = self.weight(msg)
            if problem:
                rejected.append(_event(msg, problem))
                continue
            msg.content[METRICS_KEY][WEIGHT_KEY] = weight
            weighted.append(msg)
        kept, clipped = weighted, []
        whole = from_record(global_arrays)
        for key in (ARRAYS_KEY, *extra) if bound else ():
            references = [
                (from_record(sent[m.metadata.src_node_id]) if sent and m.metadata.src_node_id in sent else whole)
                if key == ARRAYS_KEY
                else None
                for m in kept
            ]
            kept, out, clip = self._bound(kept, key, references)
            rejected += out
            clipped += clip
        return kept + [m for m in replies if m.has_error()], rejected, clipped

    def state_dict(self) -> dict[str, dict[str, int]]:
        """What the guard learnt in the run (node -> partition, pinned data sizes), for resuming it."""
        return {
            "partition_of_node": {str(n): p for n, p in self.book.by_node.items()},
            "pinned_size": {str(p): size for p, size in self.pinned.items()},
        }

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        """Continue from :meth:`state_dict`: a resumed run keeps binding nodes and pinning sizes as before."""
        self.book.by_node = {int(n): int(p) for n, p in state.get("partition_of_node", {}).items()}
        self.pinned = {int(p): int(size) for p, size in state.get("pinned_size", {}).items()}

    def weight(self, msg: Message) -> tuple[float, str | None]:
        """The server's weight for a sound reply, or a reason to reject it."""
        metrics = msg.content[METRICS_KEY]
        pid, size = int(metrics[PARTITION_KEY]), int(metrics[DATA_SIZE_KEY])
        mode, planned = self.params.weights, (self.plan or {}).get(pid)
        if mode == "uniform":
            return 1.0, None
        if planned is not None and size == planned:
            return float(planned), None
        if mode == "plan":
            if planned is None:
                return 0.0, f"the server has no planned size for partition {pid}; use robust.weights=bounded"
            return 0.0, f"'{DATA_SIZE_KEY}' is {size}, the server's partition {pid} holds {planned} rows"
        pinned = self.pinned.setdefault(pid, size)
        if size != pinned:
            return 0.0, f"'{DATA_SIZE_KEY}' is {size}, this partition reported {pinned} before"
        cap = self.params.max_weight or (max(self.plan.values()) if self.plan else None)
        return float(min(pinned, cap) if cap else pinned), None

    def _bound(
        self, replies: list[Message], key: str, references: list[dict[str, np.ndarray] | None]
    ) -> tuple[list[Message], list[dict[str, Any]], list[dict[str, Any]]]:
        deltas = [_delta(from_record(m.content[key]), ref) for m, ref in zip(replies, references, strict=True)]
        norms = [_norm(d) for d in deltas]
        kept, rejected, clipped = [], [], []
        for i, msg in enumerate(replies):
            bound = self._limit([n for j, n in enumerate(norms) if j != i])
            if norms[i] <= bound:
                kept.append(msg)
                continue
            what = f"'{key}' update norm {norms[i]:.4g} exceeds the bound {bound:.4g}"
            if self.params.on_exceed == "reject":
                rejected.append(_event(msg, what + " (robust.on_exceed=reject)"))
                continue
            scaled = {k: v * (bound / norms[i]) for k, v in deltas[i].items()}
            reference = references[i]
            new = {k: (reference[k] + v if reference is not None else v).astype(np.float32) for k, v in scaled.items()}
            msg.content[key] = to_record(new)
            clipped.append(_event(msg, what + ": clipped onto it"))
            kept.append(msg)
        return kept, rejected, clipped

    def _limit(self, others: list[float]) -> float:
        limit = self.params.max_update_norm or float("inf")
        median = float(np.median(others)) if others else 0.0
        if self.params.norm_factor and median > 0:
            limit = min(limit, self.params.norm_factor * median)
        return limit


def _delta(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    as64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    return as64 if reference is None else {k: v - reference[k].astype(np.float64) for k, v in as64.items()}


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v))) for v in arrays.values())))


def _event(msg: Message, reason: str) -> dict[str, Any]:
    return {"node": msg.metadata.src_node_id, "partition": int(msg.content[METRICS_KEY][PARTITION_KEY]),
            "reason": reason}  # fmt: skip


def all_finite(arrays: ArrayRecord) -> bool:
    """Whether every value of an aggregate is finite (the last line of defence before it becomes the global)."""
    return all(np.isfinite(v).all() for v in from_record(arrays).values())

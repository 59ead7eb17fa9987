"""The server's full state after each round, saved so that an interrupted run can continue.

One file, ``<run dir>/resume_state.npz``, replaced atomically after every round:
the global adapter, the strategy's state (:meth:`state_dict`: FedAvgM's momentum,
FedAdam/FedYogi/FedAdagrad's moments, SCAFFOLD's server control variate ``c`` and every
partition's ``c_i``), the round and phase, the Python, NumPy and torch RNG states, the cumulative
byte counts, the summary so far, every metrics row written, and what the reply guard learnt
(:meth:`fedllm_app.server.guard.ReplyGuard.state_dict`: which node holds which partition and the data
sizes pinned under ``robust.weights=bounded``, so a node cannot re-claim a larger weight after a restart).
``resume=<run dir>`` loads it (:func:`load_state`) and the run continues with the next round.
Which partitions train in a round depends on the seed and the round only (:mod:`strategies.sampling`),
so a resumed run draws the same clients as an uninterrupted one.

What is not in it: the local-only baseline's adapters, which live in each node's
``context.state``; a resumed run is a new Flower run, so resuming ``strategy=local`` is refused.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from strategies.records import from_record, to_record

STATE_FILE = "resume_state.npz"


@dataclass
class ResumeState:
    """What :func:`load_state` returns."""

    phase: str
    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any]
    totals: dict[str, int]
    summary: dict[str, Any]
    last_eval: dict[str, float]
    metrics: list[dict[str, Any]]
    rng: dict[str, Any]
    guard: dict[str, Any] = field(default_factory=dict)


def save_state(
    run_dir: Path,
    *,
    phase: str,
    server_round: int,
    arrays: ArrayRecord,
    strategy_state: dict[str, Any],
    totals: dict[str, int],
    summary: dict[str, Any],
    last_eval: dict[str, float],
    metrics: list[dict[str, Any]],
    guard_state: dict[str, Any] | None = None,
) -> Path:
    """Write the state after ``server_round`` (atomically: a crash never leaves half a file)."""
    flat = {f"global/{k}": v for k, v in from_record(arrays).items()}
    none_keys = []
    for key, value in strategy_state.items():
        if value is None:
            none_keys.append(key)
            continue
        if not isinstance(value, dict):
            raise TypeError(f"strategy state {key!r} must be a dict of arrays or None, got {type(value).__name__}")
        flat.update({f"strategy/{key}/{name}": np.asarray(a) for name, a in value.items()})
    np_state = np.random.get_state()
    flat["rng/torch"] = torch.get_rng_state().numpy()
    flat["rng/numpy"] = np.asarray(np_state[1])
    py_state = random.getstate()
    meta = {
        "phase": phase,
        "round": server_round,
        "strategy_none": none_keys,
        "strategy_keys": sorted(strategy_state),
        "totals": totals,
        "summary": summary,
        "last_eval": last_eval,
        "metrics": metrics,
        "guard": guard_state or {},
        "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]], "numpy": [np_state[0], *np_state[2:]]},
    }
    flat["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, **flat)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_state(run_dir: Path) -> ResumeState:
    """The state saved in ``run_dir``; a missing file raises FileNotFoundError naming it."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={run_dir}: no {STATE_FILE} there; give the folder of a run that completed at least "
            "one round (<output_dir>/<run_name>)"
        )
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    strategy: dict[str, Any] = {key: None for key in meta["strategy_none"]}
    for key in meta["strategy_keys"]:
        if key not in strategy:
            prefix = f"strategy/{key}/"
            strategy[key] = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    rng = {"torch": arrays["rng/torch"], "numpy_keys": arrays["rng/numpy"], **meta["rng"]}
    global_ = {k[len("global/") :]: v for k, v in arrays.items() if k.startswith("global/")}
    return ResumeState(
        phase=meta["phase"],
        round=int(meta["round"]),
        arrays=to_record(global_),
        strategy=strategy,
        totals=meta["totals"],
        summary=meta["summary"],
        last_eval=meta["last_eval"],
        metrics=meta["metrics"],
        rng=rng,
        guard=meta.get("guard", {}),
    )


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the Python, NumPy and torch RNGs to a saved state."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, rng["numpy_keys"], pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(np.asarray(rng["torch"], dtype=np.uint8)))

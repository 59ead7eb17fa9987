"""Fault injection for testing the server's checks: a client that corrupts its own reply.

Only for tests and demonstrations: ``fault_injection`` in the run config lists
``<kind>-r<round>-p<partition>`` entries, e.g. ``fault_injection=[nan-r1-p0,shape-r2-p1]``
(parsed and validated by :func:`fedllm_app.config.parse_faults`), and that client replaces
its good reply with a bad one of that kind in that round (``<kind>-every-p<partition>``: every round).
``scale`` and ``signflip`` are the model-poisoning attacks of the robustness benchmark: the update
``trained - global`` is sent multiplied by :data:`SCALE` or by -1. Inert unless configured.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedllm_app.config import FAULT_KINDS
from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY

SCALE = 10.0  # the scaling attack's factor on the update


def corrupt(content: RecordDict, kind: str, global_: dict[str, np.ndarray] | None = None) -> RecordDict:
    """A copy of a reply's content made bad in the way ``kind`` names (attacks need the round's ``global_``)."""
    arrays = {k: v.numpy().copy() for k, v in content[ARRAYS_KEY].items()}
    if kind in ("scale", "signflip"):
        if global_ is None:
            raise ValueError(f"fault kind {kind!r} needs the round's global arrays")
        factor = SCALE if kind == "scale" else -1.0
        arrays = {k: (global_[k] + factor * (v - global_[k])).astype(v.dtype) for k, v in arrays.items()}
    metrics = dict(content[METRICS_KEY])
    first = sorted(arrays)[0]
    if kind == "names":
        arrays[first + ".renamed"] = arrays.pop(first)
    elif kind == "shape":
        arrays[first] = arrays[first][..., :-1]
    elif kind in ("scale", "signflip"):
        pass
    elif kind in ("nan", "inf"):
        arrays[first].flat[0] = np.nan if kind == "nan" else np.inf
    elif kind in ("zero_examples", "negative_examples"):
        metrics[NUM_EXAMPLES_KEY] = 0 if kind == "zero_examples" else -5
    else:
        raise ValueError(f"unknown fault kind {kind!r}; choose one of {', '.join(FAULT_KINDS)}")
    out = RecordDict(dict(content.items()))
    out[ARRAYS_KEY] = ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()})
    out[METRICS_KEY] = MetricRecord(metrics)
    return out

"""Fault injection for testing the server's checks: a client that corrupts its own reply.

Only for tests and demonstrations: ``fault_injection`` in the run config lists
``<kind>-r<round>-p<partition>`` entries, e.g. ``fault_injection=[nan-r1-p0,shape-r2-p1]``,
and that client replaces its good reply with a bad one of that kind in that round.
The kinds are :data:`KINDS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY

KINDS = ("names", "shape", "nan", "inf", "zero_examples", "negative_examples")
_ENTRY = re.compile(r"^([a-z_]+)-r(\d+)-p(\d+)$")


def parse(entries: Iterable[str]) -> dict[tuple[int, int], str]:
    """``["nan-r1-p0"]`` -> ``{(1, 0): "nan"}``; a bad entry raises ValueError naming it."""
    out = {}
    for entry in entries:
        match = _ENTRY.match(str(entry))
        if not match or match.group(1) not in KINDS:
            raise ValueError(
                f"fault_injection entry {entry!r} must be <kind>-r<round>-p<partition> with kind one of "
                f"{', '.join(KINDS)}; e.g. fault_injection=[nan-r1-p0]"
            )
        out[(int(match.group(2)), int(match.group(3)))] = match.group(1)
    return out


def corrupt(content: RecordDict, kind: str) -> RecordDict:
    """A copy of a reply's content made bad in the way ``kind`` names."""
    arrays = {k: v.numpy().copy() for k, v in content[ARRAYS_KEY].items()}
    metrics = dict(content[METRICS_KEY])
    first = sorted(arrays)[0]
    if kind == "names":
        arrays[first + ".renamed"] = arrays.pop(first)
    elif kind == "shape":
        arrays[first] = arrays[first][..., :-1]
    elif kind in ("nan", "inf"):
        arrays[first].flat[0] = np.nan if kind == "nan" else np.inf
    elif kind in ("zero_examples", "negative_examples"):
        metrics[NUM_EXAMPLES_KEY] = 0 if kind == "zero_examples" else -5
    else:
        raise ValueError(f"unknown fault kind {kind!r}; choose one of {', '.join(KINDS)}")
    out = RecordDict(dict(content.items()))
    out[ARRAYS_KEY] = ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()})
    out[METRICS_KEY] = MetricRecord(metrics)
    return out

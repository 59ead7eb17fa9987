"""Named numpy arrays <-> Flower ArrayRecord (names kept)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.aggregation import Arrays


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}


def is_integer(value: object) -> bool:
    """Whether a value from a message is a whole number: an ``int``, and not a ``bool`` (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)

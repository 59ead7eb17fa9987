"""The server's held-out evaluation rows, drawn from a catalogue dataset before it is partitioned.

(The synthetic set draws its held-out rows from another seed instead: :func:`fedllm_app.data.pipeline`.)
"""

from __future__ import annotations

import random

from fedllm_app.config import ConfigError
from fedllm_app.data.rows import Row


def hold_out(rows: list[Row], n: int, seed: int, source: str) -> tuple[list[Row], list[Row]]:
    """``n`` rows drawn with the seed for the server's evaluation; the rest, in order, for training."""
    if n >= len(rows):
        raise ConfigError(
            f"dataset {source} has {len(rows)} rows: dataset.heldout={n} would leave none for training; "
            f"lower dataset.heldout"
        )
    picked = set(random.Random(f"fedllm-heldout-{seed}").sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]

"""The server's held-out evaluation rows, drawn from a catalogue dataset before it is partitioned.

No training row repeats a held-out prompt: a dataset that holds the same prompt several
times keeps its copies out of training. (The synthetic set instead draws its held-out rows
from a reserved share of each domain's prompts: :func:`fedllm_app.data.synthetic.train_test`.)
"""

from __future__ import annotations

import logging
import random

from fedllm_app.config import ConfigError
from fedllm_app.data.catalogue import prompt_key
from fedllm_app.data.rows import Row

log = logging.getLogger("fedllm")


def hold_out(rows: list[Row], n: int, seed: int, source: str) -> tuple[list[Row], list[Row]]:
    """``n`` rows drawn with the seed for the server's evaluation; the rest, in order, for training.

    Training rows whose prompt is also a held-out row's are dropped (and counted in the log).
    """
    if n >= len(rows):
        raise ConfigError(
            f"dataset {source} has {len(rows)} rows: dataset.heldout={n} would leave none for training; "
            f"lower dataset.heldout"
        )
    picked = set(random.Random(f"fedllm-heldout-{seed}").sample(range(len(rows)), n))
    test = [r for i, r in enumerate(rows) if i in picked]
    held = {prompt_key(r) for r in test}
    train = [r for i, r in enumerate(rows) if i not in picked and prompt_key(r) not in held]
    if repeats := len(rows) - n - len(train):
        log.info("dataset %s: %d training rows repeat a held-out prompt and are left out of training", source, repeats)
    if not train:
        raise ConfigError(
            f"dataset {source}: every training row repeats a held-out prompt; lower dataset.heldout "
            f"or set dataset.deduplicate=true"
        )
    return train, test

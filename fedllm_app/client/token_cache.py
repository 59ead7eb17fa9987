"""Tokenise each partition once per machine: TRL's prepared dataset, cached on disk by content.

In a simulation every worker process builds its own trainer for each partition it serves,
and TRL tokenises the partition in the trainer's constructor. :func:`cached_trainer_class`
wraps TRL's own ``_prepare_dataset`` so that its result is saved (``datasets``' Arrow
format, memory-mapped on load) under ``$FEDLLM_CACHE/tokenised/<key>``; a second worker,
round or run meeting the same rows with the same tokenizer and settings loads it instead.

The key hashes, with ``datasets``' own :class:`~datasets.fingerprint.Hasher`: the rows in
TRL form, the tokenizer, the trainer class, the TRL version and every training argument
except those that vary per run without touching the data (paths, seeds, learning rate,
steps). A changed argument can only cause a miss, never a wrong hit. Cache folders are
created private (0700, files 0600): they hold the training text.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("fedllm")

# Training arguments that differ between runs or rounds but never change the prepared data.
_VOLATILE_ARGS = frozenset(
    {"output_dir", "logging_dir", "run_name", "seed", "data_seed", "learning_rate", "max_steps", "hub_token"}
)

# How many times this process actually ran TRL's tokenisation (cache misses); tests read it.
_MISSES = {"count": 0}


def prepare_count() -> int:
    """How many partitions this process tokenised itself (cache misses)."""
    return _MISSES["count"]


def cache_dir() -> Path:
    """``$FEDLLM_CACHE/tokenised`` (default ``~/.cache/fedllm/tokenised``)."""
    from fedllm_app.tiny_model import cache_root

    return cache_root() / "tokenised"


def cache_key(trainer_class: type, dataset: Any, tokenizer: Any, args: Any, *extra: Any) -> str:
    """A content hash of everything TRL's dataset preparation reads."""
    import trl
    from datasets.fingerprint import Hasher

    hasher = Hasher()
    settings = {k: v for k, v in sorted(args.to_dict().items()) if k not in _VOLATILE_ARGS}
    for part in (trainer_class.__name__, trl.__version__, settings, extra):
        hasher.update(repr(part))
    hasher.update(dataset.data.table)  # the rows themselves, not an in-memory dataset's random fingerprint
    hasher.update(tokenizer)
    return hasher.hexdigest()


def _private_save(dataset: Any, target: Path) -> None:
    """Save ``dataset`` to ``target`` atomically, owner-only; a concurrent writer's copy wins quietly."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(target.parent, 0o700)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))  # mkdtemp makes it 0700
    try:
        dataset.save_to_disk(str(tmp))
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_prepare(key: str, prepare: Any) -> Any:
    """The prepared dataset for ``key``: loaded from the cache, or made by ``prepare()`` and saved."""
    from datasets import Dataset, load_from_disk

    target = cache_dir() / key
    if (target / "dataset_info.json").exists():
        return load_from_disk(str(target))
    _MISSES["count"] += 1
    prepared = prepare()
    if isinstance(prepared, Dataset):
        _private_save(prepared, target)
        return load_from_disk(str(target))  # memory-mapped, as a hit would be
    return prepared


def cached_trainer_class(trainer_class: type) -> type:
    """``trainer_class`` (TRL's SFTTrainer or DPOTrainer) with its dataset preparation cached on disk."""

    class Cached(trainer_class):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, *rest: Any) -> Any:
            from datasets import Dataset

            prepare = super()._prepare_dataset
            if not isinstance(dataset, Dataset) or any(callable(r) for r in rest):
                return prepare(dataset, processing_class, args, *rest)
            key = cache_key(trainer_class, dataset, processing_class, args, *rest)
            return cached_prepare(key, lambda: prepare(dataset, processing_class, args, *rest))

    Cached.__name__ = Cached.__qualname__ = f"Cached{trainer_class.__name__}"
    return Cached

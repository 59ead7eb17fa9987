"""The pipeline composed for a run config: what a client trains on and what the server evaluates on.

The data of a run is ``dataset`` (the built-in synthetic set or a catalogue entry,
:mod:`fedllm_app.data.catalogue`), split into ``num_clients`` partitions by ``partition``
(:mod:`fedllm_app.data.partitions`) after holding out the server's evaluation rows
(:mod:`fedllm_app.data.holdout`), whose prompts no client trains on. Every process
rebuilds the same split from the seed, so no data travels. In a real federation a
SuperNode can instead train on its own file, named in its node config (``data-path``,
:func:`local_rows`): the whole file is its partition and never leaves it.
With ``privacy.canaries.count > 0`` the canaries of the exposure audit (:mod:`fedllm_app.data.canaries`)
are inserted into one partition's training rows right after the split.
Rows are described in :mod:`fedllm_app.data.rows`.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import ConfigError, conf_dir, task_name
from fedllm_app.data import canaries, catalogue, pairs, partitions, synthetic
from fedllm_app.data.holdout import hold_out
from fedllm_app.data.rows import Row

log = logging.getLogger("fedllm")
Split = tuple[tuple[tuple[Row, ...], ...], tuple[Row, ...]]

# Explicit per-process cache of the loaded split, keyed on the config sections that shape it.
_SPLITS: dict[str, Split] = {}
_LOCAL: dict[str, list[Row]] = {}
# Split keys whose canaries this process has announced (logged once per process, where they are trained).
_ANNOUNCED: set[str] = set()


def _split_key(cfg: DictConfig) -> str:
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "partition") if k in cfg}
    extra = (task_name(cfg), cfg.num_clients, cfg.seed, cfg.training.batch_size, canaries.CanarySpec.from_config(cfg))
    return json.dumps([parts, extra], sort_keys=True, default=str)


def _load(cfg: DictConfig) -> Split:
    key = _split_key(cfg)
    if key not in _SPLITS:
        if len(_SPLITS) >= 4:
            _SPLITS.clear()
        _SPLITS[key] = _build(cfg)
    return _SPLITS[key]


def _build(cfg: DictConfig) -> Split:
    d = cfg.dataset
    if d.name == "synthetic":
        train_ex, test_ex = synthetic.train_test(d.train_per_domain, d.test_per_domain, cfg.seed)
        train, test = [r.as_dict() for r in train_ex], [r.as_dict() for r in test_ex]
        if task_name(cfg) == "dpo":
            train, test = pairs.make_pairs(train, cfg.seed), pairs.make_pairs(test, cfg.seed + 10_000)
    else:
        rows = catalogue.load_rows(d, task_name(cfg), cfg.seed)
        train, test = hold_out(rows, int(d.heldout), cfg.seed, catalogue.source_name(d))
        if d.get("heldout_in_training"):  # a FlowerTune challenge trains on its whole fixed set
            train = rows
    parts = partitions.split(train, cfg.partition, cfg.num_clients, cfg.seed, cfg.training.batch_size)
    parts = canaries.insert(parts, canaries.CanarySpec.from_config(cfg))
    return tuple(tuple(p) for p in parts), tuple(test)


def partition(cfg: DictConfig, partition_id: int) -> list[Row]:
    """The rows held by client ``partition_id``."""
    parts, _ = _load(cfg)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(
            f"partition-id={partition_id} is outside 0..{len(parts) - 1}: the run config has num_clients={len(parts)}; "
            f"start as many SuperNodes (num-supernodes) as num_clients"
        )
    spec = canaries.CanarySpec.from_config(cfg)
    if spec.count and spec.partition == partition_id and (key := _split_key(cfg)) not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.info("client %d: %s", partition_id, canaries.describe(spec))
    return list(parts[partition_id])


def local_rows(cfg: DictConfig, path: str, who: str = "this node") -> list[Row]:
    """A SuperNode's private file (node config ``data-path``), read in the run's dataset format.

    With ``dataset=synthetic`` the file uses the ``custom`` columns (prompt/response, or
    prompt/chosen/rejected for DPO); with a catalogue entry, that entry's Hub columns.
    """
    d = cfg.dataset
    if d.name == "synthetic":
        d = OmegaConf.merge(catalogue_entry("custom"), {"deduplicate": False, "sample": None})
    key = json.dumps([path, OmegaConf.to_container(d, resolve=True), task_name(cfg), cfg.seed], default=str)
    if key not in _LOCAL:
        try:
            _LOCAL[key] = catalogue.load_rows(d, task_name(cfg), cfg.seed, path=path)
        except ConfigError as err:
            if cfg.dataset.name != "synthetic":
                raise
            raise ConfigError(
                f"{who}: {err} (with dataset=synthetic a node's own file is read as dataset=custom; run with the "
                f"dataset its columns come from, e.g. dataset=alpaca_gpt4, or dataset=custom "
                f"dataset.columns.prompt=...)"
            ) from None
        log.info("%s: training on its own file '%s' (%d rows, never sent)", who, path, len(_LOCAL[key]))
    return list(_LOCAL[key])


def catalogue_entry(name: str) -> DictConfig:
    """A dataset entry of conf/dataset/ on its own (without the partition it selects)."""
    entry = OmegaConf.load(conf_dir() / "dataset" / f"{name}.yaml")
    return OmegaConf.create({k: v for k, v in entry.items() if k != "defaults"})


def all_partitions(cfg: DictConfig) -> list[list[Row]]:
    parts, _ = _load(cfg)
    return [list(p) for p in parts]


def pooled(cfg: DictConfig) -> list[Row]:
    """Every client's rows together (the centralised baseline's data; simulation only)."""
    return [r for p in all_partitions(cfg) for r in p]


def heldout(cfg: DictConfig) -> list[Row]:
    """The server's held-out split."""
    return list(_load(cfg)[1])


def domain_mix(rows: list[Row], by: str = "domain") -> dict[str, int]:
    """How many rows of each value of ``by`` (a client's domain or label mix)."""
    return partitions.mix(rows, by)

"""Datasets, client partitions, private node files and OpenFedLLM's per-round sampling.

The data of a run is ``dataset`` (the built-in synthetic set or a catalogue entry,
:mod:`fedllm_app.catalogue`), split into ``num_clients`` partitions by ``partition``
(:mod:`fedllm_app.partitioning`) after holding out the server's evaluation rows.
Every process rebuilds the same split from the seed, so no data travels. In a real
federation a SuperNode can instead train on its own file, named in its node config
(``data-path``, :func:`local_rows`): the whole file is its partition and never leaves it.

Rows are dicts: ``{"instruction", "response", "domain", ...}`` for SFT and
``{"prompt", "chosen", "rejected", "domain", ...}`` for DPO (``prompt`` is a list of
chat messages).
"""

from __future__ import annotations

import json
import random
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedllm_app import catalogue, partitioning, preferences, synthetic
from fedllm_app.config import ConfigError
from fedllm_app.templates import STRING_TEMPLATES, check_template, to_prompt_completion

Row = dict[str, Any]
Split = tuple[tuple[tuple[Row, ...], ...], tuple[Row, ...]]

# Explicit per-process cache of the loaded split, keyed on the config sections that shape it.
_SPLITS: dict[str, Split] = {}
_LOCAL: dict[str, list[Row]] = {}


def task_name(cfg: DictConfig) -> str:
    return str(cfg.task.name) if "task" in cfg else "sft"


def _split_key(cfg: DictConfig) -> str:
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "partition") if k in cfg}
    extra = (task_name(cfg), cfg.num_clients, cfg.seed, cfg.training.batch_size)
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
        train = [r.as_dict() for r in synthetic.generate(d.train_per_domain, cfg.seed)]
        test = [r.as_dict() for r in synthetic.generate(d.test_per_domain, cfg.seed + 10_000)]
        if task_name(cfg) == "dpo":
            train, test = preferences.make_pairs(train, cfg.seed), preferences.make_pairs(test, cfg.seed + 10_000)
    else:
        rows = catalogue.load_rows(d, task_name(cfg), cfg.seed)
        train, test = hold_out(rows, int(d.heldout), cfg.seed, catalogue.source_name(d))
    parts = partitioning.split(train, cfg.partition, cfg.num_clients, cfg.seed, cfg.training.batch_size)
    return tuple(tuple(p) for p in parts), tuple(test)


def hold_out(rows: list[Row], n: int, seed: int, source: str) -> tuple[list[Row], list[Row]]:
    """``n`` rows drawn with the seed for the server's evaluation; the rest, in order, for training."""
    if n >= len(rows):
        raise ConfigError(
            f"dataset {source} has {len(rows)} rows: dataset.heldout={n} would leave none for training; "
            f"lower dataset.heldout"
        )
    picked = set(random.Random(f"fedllm-heldout-{seed}").sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def partition(cfg: DictConfig, partition_id: int) -> list[Row]:
    """The rows held by client ``partition_id``."""
    parts, _ = _load(cfg)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(
            f"partition-id={partition_id} is outside 0..{len(parts) - 1}: the run config has num_clients={len(parts)}; "
            f"start as many SuperNodes (num-supernodes) as num_clients"
        )
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
        print(f"[fedllm] {who}: training on its own file '{path}' ({len(_LOCAL[key])} rows, never sent)", flush=True)
    return list(_LOCAL[key])


def catalogue_entry(name: str) -> DictConfig:
    """A dataset entry of conf/dataset/ on its own (without the partition it selects)."""
    from fedllm_app.config import conf_dir

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


def examples_per_round(cfg: DictConfig) -> int:
    t = cfg.training
    return t.batch_size * t.grad_accum * t.max_steps


def round_indices(
    num_rows: int, cfg: DictConfig, server_round: int, partition_id: int, multiplier: int = 1
) -> list[int]:
    """OpenFedLLM's scheme: ``batch_size x grad_accum x max_steps`` row indices drawn without
    replacement, seeded by (seed, round, client); all rows, shuffled, if fewer.
    """
    n = examples_per_round(cfg) * multiplier
    rng = random.Random(f"{cfg.seed}-{server_round}-{partition_id}")
    if num_rows <= n:
        picked = list(range(num_rows))
        rng.shuffle(picked)
        return picked
    return rng.sample(range(num_rows), n)


def is_preference(rows: list[Row]) -> bool:
    return bool(rows) and "chosen" in rows[0]


def flatten_turns(messages: list[dict[str, str]]) -> str:
    """A conversation as one instruction string (for the alpaca/vicuna string templates)."""
    if len(messages) == 1:
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def to_preference(row: Row, template: str) -> dict[str, Any]:
    """One row in TRL's preference form (conversational for ``chat``)."""
    check_template(template)
    if template == "chat":
        return {
            "prompt": list(row["prompt"]),
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
    prompt = STRING_TEMPLATES[template].format(instruction=flatten_turns(row["prompt"]))
    return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


def to_trl(rows: list[Row], template: str) -> Any:
    """A ``datasets.Dataset`` in TRL's prompt/completion (SFT) or prompt/chosen/rejected (DPO) form."""
    from datasets import Dataset

    if is_preference(rows):
        return Dataset.from_list([to_preference(r, template) for r in rows])
    return Dataset.from_list([to_prompt_completion(r["instruction"], r["response"], template) for r in rows])


def domain_mix(rows: list[Row], by: str = "domain") -> dict[str, int]:
    """How many rows of each value of ``by`` (a client's domain or label mix)."""
    return partitioning.mix(rows, by)

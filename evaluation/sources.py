"""Where each benchmark's rows come from: its Hub dataset, or the same rows from a local folder.

Every benchmark names its Hugging Face dataset (id, config, split). With ``--data-dir DIR`` the rows are
read instead from ``DIR/<bench>.jsonl`` (or ``.json``, ``.parquet``, ``.csv``), a file holding the rows of the
evaluated split with exactly the Hub dataset's columns and nesting. Nothing from a benchmark is stored in
this repository; the tests' fixtures are invented rows in the same shapes.

``--limit N`` takes a seeded random sample of N rows (:func:`sample_rows`), stratified by a column where the
source names one (MMLU's ``subject``: the Hub's test split is sorted by subject, so its first rows would be
one or two subjects), never the first N. :func:`load_benchmark` also says where the rows really came from
(the local file and its SHA-256, or the Hub dataset and revision), for the result JSON.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
PARQUET_EXPORT = "refs/convert/parquet"
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataSourceError(ValueError):
    """A benchmark's rows could not be loaded; the message names the source and the fix."""


@dataclass(frozen=True)
class Source:
    """A benchmark's data on the Hugging Face Hub.

    Attributes
    ----------
    name : str
        Benchmark name; also the local file's stem under ``--data-dir``.
    hub_id : str
        Dataset id on the Hub (or a URL of a JSON-lines file, loaded with the ``json`` builder).
    config : str | None
        Dataset configuration (subset), if the dataset has several.
    split : str
        The evaluated split.
    columns : tuple[str, ...]
        Columns every row must have (checked for local files and Hub data alike).
    select : Callable | None
        Applied to the Hub dataset only, to reproduce the reference evaluation's own test split
        (e.g. FinGPT's seeded ``train_test_split``); a local file already holds the evaluated rows.
    revision : str | None
        Hub revision; ``refs/convert/parquet`` reads the Hub's Parquet export of a dataset that only has a
        loading script (which ``datasets`` >= 4 no longer runs); the config is then its folder.
    stratify : str | None
        Column a ``--limit`` sample is stratified by (each value keeps its share of the rows).
    """

    name: str
    hub_id: str
    config: str | None
    split: str
    columns: tuple[str, ...]
    select: Callable[[Any], Any] | None = None
    revision: str | None = None
    stratify: str | None = None

    def hub_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``datasets.load_dataset`` for this source."""
        if self.hub_id.startswith(("http://", "https://")):
            return {"path": "json", "data_files": self.hub_id, "split": "train"}
        if self.revision == PARQUET_EXPORT:
            return {"path": self.hub_id, "revision": self.revision, "data_dir": self.config, "split": self.split}
        return {"path": self.hub_id, "name": self.config, "split": self.split, "revision": self.revision}

    def describe(self) -> str:
        cfg = f" ({self.config})" if self.config else ""
        return f"{self.hub_id}{cfg}, split {self.split}"


def local_file(data_dir: str | Path, name: str) -> Path | None:
    """The local file for benchmark ``name`` under ``data_dir``, if one exists."""
    for suffix in LOCAL_SUFFIXES:
        path = Path(data_dir).expanduser() / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def sample_rows(rows: list[dict], limit: int | None, seed: int, stratify: str | None = None) -> list[dict]:
    """A seeded random sample of ``limit`` rows, in their original order (all rows if ``limit`` is unset or
    not smaller). With ``stratify``, each value of that column gets its share of ``limit`` (largest
    remainders first, ties broken by the seeded shuffle), so every value with enough weight is present.
    """
    if not limit or limit >= len(rows):
        return list(rows)
    if limit < 0:
        raise DataSourceError(f"--limit {limit} must be a positive number of rows (or unset for all rows)")
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.get(stratify) if stratify else None].append(i)
    keys = list(groups)
    rng.shuffle(keys)
    quota = {k: limit * len(groups[k]) / len(rows) for k in keys}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(keys, key=lambda k: quota[k] - take[k], reverse=True)[: limit - sum(take.values())]:
        take[k] += 1
    chosen = sorted(i for k in keys for i in rng.sample(groups[k], take[k]))
    return [rows[i] for i in chosen]


def load_rows(
    source: Source, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> list[dict]:
    """The benchmark's rows as dicts (from ``data_dir`` if given, else from the Hub); see :func:`load_benchmark`."""
    return load_benchmark(source, data_dir, limit, seed)[0]


def load_benchmark(
    source: Source, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> tuple[list[dict], dict[str, Any]]:
    """(rows, where they came from): the rows from ``data_dir`` if given, else from the Hub, sampled by
    :func:`sample_rows` when ``limit`` is set.
    """
    ds, origin = _local(source, data_dir) if data_dir is not None else _hub(source)
    missing = [c for c in source.columns if c not in ds.column_names]
    if missing:
        raise DataSourceError(
            f"benchmark {source.name!r} data at {origin['location']} lacks column(s) {missing}; it has "
            f"{ds.column_names}. Give rows shaped like {source.describe()}"
        )
    rows = ds.to_list()
    picked = sample_rows(rows, limit, seed, source.stratify)
    origin.update(rows=len(picked), of=len(rows))
    if len(picked) < len(rows):
        origin["sample"] = f"seeded random sample (seed {seed})" + (
            f", stratified by {source.stratify}" if source.stratify else ""
        )
    return picked, origin


def _local(source: Source, data_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    path = local_file(data_dir, source.name)
    if path is None:
        raise DataSourceError(
            f"no local data for benchmark {source.name!r}: expected {Path(data_dir) / source.name}.jsonl "
            f"(or .json/.parquet/.csv) with the columns of {source.describe()}: {', '.join(source.columns)}; "
            f"drop --data-dir to load it from the Hub"
        )
    disable_progress_bar()  # a local file loads in an instant
    try:
        ds = load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
    finally:
        enable_progress_bar()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    origin = {"kind": "local file", "location": str(path.resolve()), "sha256": digest}
    return ds, {**origin, "shaped_like": source.describe()}


def _hub(source: Source) -> tuple[Any, dict[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(**source.hub_kwargs())
    except Exception as err:  # noqa: BLE001 - any failure to reach the data gets the same advice
        raise DataSourceError(
            f"cannot load benchmark {source.name!r} from {source.describe()}: {str(err).splitlines()[0]}; "
            f"check the network / HF token, or pass --data-dir with a {source.name}.jsonl file"
        ) from err
    if source.select is not None:
        ds = source.select(ds)
    origin = {"kind": "Hugging Face Hub", "location": source.describe(), "revision": source.revision or "main"}
    return ds, {**origin, "fingerprint": getattr(ds, "_fingerprint", None)}

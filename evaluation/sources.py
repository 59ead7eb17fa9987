"""Where each benchmark's rows come from: its Hub dataset, or the same rows from a local folder.

Every benchmark names its Hugging Face dataset (id, config, split). With ``--data-dir DIR`` the rows are
read instead from ``DIR/<bench>.jsonl`` (or ``.json``, ``.parquet``, ``.csv``), a file holding the rows of the
evaluated split with exactly the Hub dataset's columns and nesting. Nothing from a benchmark is stored in
this repository; the tests' fixtures are invented rows in the same shapes.
"""

from __future__ import annotations

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
    """

    name: str
    hub_id: str
    config: str | None
    split: str
    columns: tuple[str, ...]
    select: Callable[[Any], Any] | None = None
    revision: str | None = None

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


def load_rows(source: Source, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The benchmark's rows as dicts (from ``data_dir`` if given, else from the Hub)."""
    from datasets import load_dataset

    if data_dir is not None:
        path = local_file(data_dir, source.name)
        if path is None:
            raise DataSourceError(
                f"no local data for benchmark {source.name!r}: expected {Path(data_dir) / source.name}.jsonl "
                f"(or .json/.parquet/.csv) with the columns of {source.describe()}: {', '.join(source.columns)}; "
                f"drop --data-dir to load it from the Hub"
            )
        from datasets.utils.logging import disable_progress_bar, enable_progress_bar

        disable_progress_bar()  # a local file loads in an instant
        try:
            ds = load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
        finally:
            enable_progress_bar()
        where = str(path)
    else:
        try:
            ds = load_dataset(**source.hub_kwargs())
        except Exception as err:  # noqa: BLE001 - any failure to reach the data gets the same advice
            raise DataSourceError(
                f"cannot load benchmark {source.name!r} from {source.describe()}: {str(err).splitlines()[0]}; "
                f"check the network / HF token, or pass --data-dir with a {source.name}.jsonl file"
            ) from err
        if source.select is not None:
            ds = source.select(ds)
        where = source.describe()
    missing = [c for c in source.columns if c not in ds.column_names]
    if missing:
        raise DataSourceError(
            f"benchmark {source.name!r} data at {where} lacks column(s) {missing}; it has {ds.column_names}. "
            f"Give rows shaped like {source.describe()}"
        )
    rows = ds.to_list()
    return rows[:limit] if limit else rows

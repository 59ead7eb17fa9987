"""Experiment trackers fed from the ServerApp: every metrics row to TensorBoard, W&B and MLflow.

``logging.report_to`` names the trackers (none by default). :func:`open_trackers` checks, before the model is
loaded, that each tracker's package imports and that its folder is writable, then opens one run per tracker
with the run config (flattened, :func:`flat_params`) as hyperparameters. :class:`Trackers` receives every row
that :class:`~fedllm_app.server.outputs.RunWriter` appends to a metrics.jsonl, turns it into scalar series
(:func:`scalars`: nested dicts such as ``bytes_by_node`` become ``bytes_by_node/<node>/sent``; strings, lists
and None are skipped) at step = server round, and closes the runs at the end (marked failed if the run raised).
Rows of another metrics file go under its folder's name: ``baseline_local/metrics.jsonl`` ->
``baseline_local/train_loss``.

Where they write (``logging.dir``, or the run folder when it is null):

- TensorBoard: ``<dir>/tensorboard`` (``<logging.dir>/tensorboard/<run_name>`` for a shared folder);
  read with ``tensorboard --logdir <dir>/tensorboard``.
- W&B: ``<dir>/wandb``, in the mode of ``WANDB_MODE``, else ``offline`` (``wandb sync`` uploads it later).
- MLflow: ``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``<dir>/mlruns/mlflow.db`` (MLflow 3 refuses its
  old ``./mlruns`` file store by default); read with ``mlflow ui --backend-store-uri sqlite:///<dir>/mlruns/mlflow.db``.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import ConfigError
from fedllm_app.console import is_verbose

log = logging.getLogger("fedllm")

METRICS_FILE = "metrics.jsonl"
STEP_KEY = "round"
# Row keys that are not series: the step itself, a constant and a wall-clock time (trackers keep their own).
NOT_SERIES = (STEP_KEY, "num_rounds", "started_at")


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics row, nested dicts flattened with ``/``; other values skipped.

    >>> scalars({"train_loss": 0.5, "bytes_by_node": {"7": {"sent": 10, "partition": None}}, "phase": "x"})
    {'train_loss': 0.5, 'bytes_by_node/7/sent': 10.0}
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, Real):  # bool too: e.g. ``aggregated`` as 0/1
            out[name] = float(value)
    return out


def flat_params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as ``{"training.learning_rate": 0.005, ...}`` (lists stay values)."""

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(walk(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    return walk(OmegaConf.to_container(cfg, resolve=True), "")


def _as_text(value: Any) -> str:
    return "null" if value is None else str(value)


@dataclass(frozen=True)
class TrackedRun:
    """What every tracker is opened with.

    Attributes
    ----------
    dir : Path
        ``logging.dir``, or the run folder when it is null.
    name : str
        The run's name (its folder name under ``output_dir``).
    project : str
        ``logging.project``: the W&B project and the MLflow experiment.
    params : dict[str, Any]
        The flattened run config, logged as hyperparameters.
    shared : bool
        True when ``dir`` is a ``logging.dir`` that several runs may share.
    verbose : bool
        Leave the trackers' own INFO output on.
    """

    dir: Path
    name: str
    project: str
    params: dict[str, Any]
    shared: bool = False
    verbose: bool = False


class Tracker(ABC):
    """One experiment tracker: opened with a :class:`TrackedRun`, then ``log`` per row and ``close`` once.

    Subclasses set ``name`` (the ``logging.report_to`` value), ``install`` (the pip command for their package)
    and, via :meth:`modules`, the modules that must import.
    """

    name: ClassVar[str]
    install: ClassVar[str]

    @classmethod
    def modules(cls) -> tuple[str, ...]:
        return (cls.name,)

    @abstractmethod
    def log(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        """Record ``values`` (their names under ``prefix``) at ``step``."""

    @abstractmethod
    def close(self, failed: bool = False) -> None:
        """Flush and end the run; ``failed`` marks it failed where the tracker has such a state."""


class TensorBoardTracker(Tracker):
    """Event files through ``torch.utils.tensorboard``; the config in the HParams tab."""

    name = "tensorboard"
    install = 'pip install "fedllm[tensorboard]" (or pip install tensorboard)'

    def __init__(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = run.dir / "tensorboard" / (run.name if run.shared else "")
        self.writer = SummaryWriter(log_dir=str(self.dir))
        values = {k: v if isinstance(v, bool | int | float | str) else _as_text(v) for k, v in run.params.items()}
        for summary in hparams(values, {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for key, value in values.items():
            self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()  # rounds are minutes apart: keep every round on disk

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in ``<dir>/wandb``; each series is plotted against its own ``round`` (``baseline_local/round``
    for the baseline's), since W&B's internal step must only grow and the baseline starts again at round 1.
    """

    name = "wandb"
    install = 'pip install "fedllm[wandb]" (or pip install wandb)'

    def __init__(self, run: TrackedRun) -> None:
        import wandb

        self.run = wandb.init(
            project=run.project,
            name=run.name,
            dir=str(run.dir),
            config=run.params,
            mode=os.environ.get("WANDB_MODE") or "offline",
            reinit="create_new",
            settings=wandb.Settings(silent=not run.verbose, console="off"),
        )
        self.defined: set[str] = set()

    def log(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        step_key = prefix + STEP_KEY
        named = {prefix + key: value for key, value in values.items()}
        if step_key not in self.defined:
            self.run.define_metric(step_key)
            self.defined.add(step_key)
        for key in named.keys() - self.defined:
            self.run.define_metric(key, step_metric=step_key)
            self.defined.add(key)
        self.run.log({**named, step_key: step})

    def close(self, failed: bool = False) -> None:
        import wandb

        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before W&B's service has written the offline run file (seen here: 1 run in 20 read
        # back empty; 0 in 100 with teardown). teardown waits for the service, as W&B's atexit hook would if the
        # ServerApp's process always exited normally; it also ends any other W&B run of this process.
        wandb.teardown()


class MlflowTracker(Tracker):
    """An MLflow run through ``MlflowClient`` (no global active run): ``MLFLOW_TRACKING_URI``, else a local
    SQLite store, with the flattened config as params.
    """

    name = "mlflow"
    install = 'pip install "fedllm[mlflow]" (or pip install mlflow)'
    MAX_PARAMS, MAX_METRICS = 100, 1000  # per log_batch call (MLflow's limits)

    @classmethod
    def modules(cls) -> tuple[str, ...]:
        # The local SQLite store needs SQLAlchemy and Alembic, which mlflow-skinny does not install.
        return ("mlflow",) if os.environ.get("MLFLOW_TRACKING_URI") else ("mlflow", "sqlalchemy", "alembic")

    def __init__(self, run: TrackedRun) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        store = run.dir / "mlruns"
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (store / "artifacts").as_uri()
            experiment_id = self.client.create_experiment(run.project, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, _as_text(value)) for key, value in run.params.items()]
        for i in range(0, len(params), self.MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + self.MAX_PARAMS])

    def log(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(prefix + key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), self.MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self.MAX_METRICS])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker)}


class Trackers:
    """The configured trackers behind one call (none when ``logging.report_to`` is empty).

    A tracker that fails to log is reported once and dropped for the rest of the run: metrics.jsonl, which
    holds every row, stays the record, and an unreachable tracking server does not stop the training.
    """

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_row(self, row: Mapping[str, Any], path: str = METRICS_FILE) -> None:
        """Send one metrics row, written to ``path`` (relative to the run folder), at step ``row["round"]``."""
        if not self.trackers:
            return
        values = {k: v for k, v in scalars(row).items() if k not in NOT_SERIES}
        step, prefix = int(row[STEP_KEY]), series_prefix(path)
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step, prefix)
            except Exception as err:  # a mirror of metrics.jsonl must not end the run
                log.warning(f"{tracker.name}: could not log round {step} ({err}); it gets no more rows this run")
                self.trackers.remove(tracker)

    def close(self, failed: bool = False) -> None:
        """End every tracker's run (once)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception as err:  # close the others all the same
                log.warning(f"{tracker.name}: could not close its run ({err})")


def series_prefix(path: str) -> str:
    """``""`` for the run's metrics.jsonl; ``"baseline_local/"`` for ``baseline_local/metrics.jsonl``."""
    if path == METRICS_FILE:
        return ""
    parent = Path(path).parent
    return f"{Path(path).stem if parent == Path('.') else parent.as_posix()}/"


def tracker_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """``logging.dir`` (resolved), else the run folder."""
    return Path(cfg.logging.dir).expanduser().resolve() if cfg.logging.dir else run_dir


def check_installed(names: list[str]) -> None:
    """Raise a ConfigError with the pip command if a tracker's package does not import."""
    for name in names:
        tracker = TRACKERS[name]
        for module in tracker.modules():
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ConfigError(
                    f"logging.report_to has {name} but {module} cannot be imported ({err}); {tracker.install}, "
                    f"or remove {name} from logging.report_to"
                ) from None


def check_writable(directory: Path, cfg: DictConfig) -> None:
    """Raise a ConfigError naming the folder (and the key that set it) if the trackers cannot write there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        key = f"logging.dir={cfg.logging.dir!r}" if cfg.logging.dir else f"the run folder {str(directory)!r}"
        raise ConfigError(
            f"{key} is not writable for the trackers ({err.strerror or err}); give logging.dir=<a folder you can "
            f"write to>"
        ) from None


def open_trackers(cfg: DictConfig, run_dir: Path) -> Trackers:
    """Check and open the trackers of ``logging.report_to`` for the run in ``run_dir``."""
    names = list(dict.fromkeys(cfg.logging.report_to))
    if not names:
        return Trackers()
    check_installed(names)
    directory = tracker_dir(cfg, run_dir)
    check_writable(directory, cfg)
    run = TrackedRun(
        dir=directory,
        name=run_dir.name,
        project=str(cfg.logging.project),
        params=flat_params(cfg),
        shared=bool(cfg.logging.dir),
        verbose=is_verbose(cfg.logging.verbose),
    )
    opened = Trackers()
    try:
        for name in names:
            opened.trackers.append(TRACKERS[name](run))
    except BaseException:
        opened.close(failed=True)
        raise
    log.info(f"trackers: {', '.join(names)} in {directory}")
    return opened

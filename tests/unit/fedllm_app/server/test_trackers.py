"""Experiment trackers: every metrics row read back from TensorBoard, W&B and MLflow; bad choices fail first."""

import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from fedllm_app.config import TRACKER_NAMES, ConfigError, load_config
from fedllm_app.server.outputs import RunWriter
from fedllm_app.server.trackers import NOT_SERIES, TRACKERS, Tracker, Trackers, scalars, series_prefix


def _row(rnd: int, loss: float | None, acc: float) -> dict:
    """A metrics.jsonl row of the shape fedllm_app/server/rounds.py writes."""
    return {
        "phase": "fedavg",
        "strategy": "FedAvgLoRA",
        "round": rnd,
        "num_rounds": 2,
        "sampled": 2,
        "replied": 2,
        "failed": 0,
        "failed_nodes": [],
        "rejected": [],
        "aggregated": True,
        "lr": 0.005 / rnd,
        "train_loss": loss,
        "bytes_sent": 200 * rnd,
        "bytes_received": 190 * rnd,
        "bytes_by_node": {
            "101": {"partition": 0, "sent": 100 * rnd, "received": 95 * rnd},
            "202": {"partition": 1, "sent": 100 * rnd, "received": 95 * rnd},
        },
        "bytes_sent_total": 200 * rnd,
        "bytes_received_total": 190 * rnd,
        "client_train_seconds": 1.5 * rnd,
        "accuracy": acc,
        "accuracy/units": acc / 2,
        "eval_loss": 2.0 / rnd,
        "seconds": 3.0,
        "started_at": 1.7e9 + rnd,
    }


ROWS = [_row(1, 1.25, 0.25), _row(2, 0.75, 0.5)]
BASELINE = [{**_row(1, 1.5, 0.0), "phase": "local"}, {**_row(2, None, 0.125), "phase": "local"}]


def _expected(row: dict) -> dict[str, float]:
    return {k: v for k, v in scalars(row).items() if k not in NOT_SERIES}


@pytest.fixture
def quiet_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, its config and cache in the test's folder."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # fedllm's default must be offline


def _config(tmp_path: Path, *overrides: str):
    return load_config({}, [f"output_dir={tmp_path}", "run_name=tracked", *overrides])


@pytest.fixture(scope="module")
def mlflow_server_uri(tmp_path_factory) -> str:
    """One SQLite store for the tests that set MLFLOW_TRACKING_URI (MLflow creates its tables once: ~5 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _write_run(tmp_path: Path, *overrides: str, failed: bool = False) -> Path:
    """A RunWriter with trackers, fed the rows as the round loop feeds it; returns the run folder."""
    writer = RunWriter(_config(tmp_path, *overrides))
    for row in ROWS:
        writer.log_round(row)
    for row in BASELINE:
        writer.log_round(row, "baseline_local/metrics.jsonl")
    writer.close(failed=failed)
    return writer.dir


def test_a_row_becomes_scalar_series_with_nested_dicts_flattened_and_text_skipped():
    got = scalars(ROWS[0])
    assert got["bytes_by_node/101/sent"] == 100.0 and got["bytes_by_node/202/received"] == 95.0
    assert got["accuracy/units"] == 0.125 and got["aggregated"] == 1.0
    assert not {"phase", "strategy", "failed_nodes", "rejected", "bytes_by_node"} & set(got)
    assert "train_loss" not in scalars(BASELINE[1])  # None is no value


def test_rows_of_another_metrics_file_go_under_its_folder_name():
    assert series_prefix("metrics.jsonl") == ""
    assert series_prefix("baseline_local/metrics.jsonl") == "baseline_local/"


def test_every_configurable_tracker_has_an_implementation():
    assert set(TRACKERS) == set(TRACKER_NAMES)


def _tensorboard_hparams(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for path in folder.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    info = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    return {k: v.number_value or v.string_value for k, v in info.session_start_info.hparams.items()}
    return {}


def test_tensorboard_events_hold_every_row_at_its_round_and_the_config_as_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _write_run(tmp_path, "logging.report_to=[tensorboard]")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for prefix, rows in (("", ROWS), ("baseline_local/", BASELINE)):
        keys = {k for row in rows for k in _expected(row)}
        for key in keys:
            got = {e.step: e.value for e in events.Scalars(prefix + key)}
            want = {row["round"]: _expected(row)[key] for row in rows if key in _expected(row)}
            assert got == pytest.approx(want, rel=1e-6), prefix + key
    assert not {"round", "num_rounds", "started_at"} & set(events.Tags()["scalars"])
    hparams = _tensorboard_hparams(run / "tensorboard")
    assert hparams["training.learning_rate"] == pytest.approx(0.005) and hparams["strategy.name"] == "fedavg"
    assert hparams["logging.report_to"] == "['tensorboard']"


def test_a_shared_logging_dir_gets_one_tensorboard_folder_per_run(tmp_path):
    shared = tmp_path / "shared"
    run = _write_run(tmp_path, "logging.report_to=[tensorboard]", f"logging.dir={shared}")
    assert list((shared / "tensorboard" / "tracked").glob("events.out.tfevents.*"))
    assert not (run / "tensorboard").exists()


def _wandb_records(run_file: Path):
    """The records of W&B's offline run file (LevelDB log format: 7-byte file header, 32 KiB blocks, records
    with a 7-byte header of crc, length and type FULL=1/FIRST=2/MIDDLE=3/LAST=4), parsed with W&B's protobuf.
    """
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = run_file.read_bytes(), 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the block's tail is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(b"".join(parts))
            parts = []


def test_wandb_offline_run_holds_every_row_against_its_round_and_the_config(tmp_path, quiet_wandb):
    run = _write_run(tmp_path, "logging.report_to=[wandb]")
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(run_file))
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    main = [h for h in history if "round" in h]
    baseline = [h for h in history if "baseline_local/round" in h]
    assert [h["round"] for h in main] == [1, 2] and [h["baseline_local/round"] for h in baseline] == [1, 2]
    for logged, row in zip(main, ROWS, strict=True):
        assert {k: logged[k] for k in _expected(row)} == pytest.approx(_expected(row))
    for logged, row in zip(baseline, BASELINE, strict=True):
        assert {k: logged["baseline_local/" + k] for k in _expected(row)} == pytest.approx(_expected(row))
    steps = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert steps["train_loss"] == "round" and steps["baseline_local/train_loss"] == "baseline_local/round"
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert run_record.project == "fedllm" and run_record.display_name == "tracked"
    assert config["training.learning_rate"] == 0.005 and config["model.lora.r"] == 16
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def _mlflow_run(uri: str, name: str = "tracked"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedllm").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")
    return client, run


@pytest.mark.slow  # MLflow creates its SQLite schema: 5-10 s
def test_mlflow_local_store_holds_every_row_at_its_round_and_the_config_as_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _write_run(tmp_path, "logging.report_to=[mlflow]")
    client, run = _mlflow_run(f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    for prefix, rows in (("", ROWS), ("baseline_local/", BASELINE)):
        for key in {k for row in rows for k in _expected(row)}:
            got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, prefix + key)}
            assert got == {row["round"]: _expected(row)[key] for row in rows if key in _expected(row)}, key
    assert run.data.params["training.learning_rate"] == "0.005" and run.data.params["dataset.name"] == "synthetic"
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"


@pytest.mark.slow  # MLflow creates its SQLite schema: 5-10 s
def test_mlflow_follows_mlflow_tracking_uri_and_marks_a_failed_run(tmp_path, monkeypatch, mlflow_server_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_uri)
    run_dir = _write_run(tmp_path, "logging.report_to=[mlflow]", "run_name=failed", failed=True)
    client, run = _mlflow_run(mlflow_server_uri, "failed")
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0.25, 0.5]
    assert not (run_dir / "mlruns").exists()


@pytest.mark.slow  # MLflow creates its SQLite schema: 5-10 s
def test_a_run_that_fails_to_load_its_model_marks_the_trackers_failed(tmp_path, monkeypatch, mlflow_server_uri):
    from fedllm_app.server import run as run_module

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_uri)

    def no_model(*_):
        raise RuntimeError("no model today")

    monkeypatch.setattr(run_module, "get_model", no_model)
    with pytest.raises(RuntimeError, match="no model today"):
        run_module.FederatedRun(_config(tmp_path, "logging.report_to=[mlflow]", "run_name=no-model"), started=0.0)
    _, run = _mlflow_run(mlflow_server_uri, "no-model")
    assert run.info.status == "FAILED"


class _Broken(Tracker):
    name, install = "broken", ""

    def log(self, values, step, prefix=""):
        raise OSError("disk full")

    def close(self, failed=False):
        pass


class _Kept(Tracker):
    name, install = "kept", ""

    def __init__(self):
        self.steps = []

    def log(self, values, step, prefix=""):
        self.steps.append(step)

    def close(self, failed=False):
        pass


def test_a_tracker_that_fails_to_log_is_reported_once_and_the_others_go_on(caplog):
    kept = _Kept()
    trackers = Trackers([_Broken(), kept])
    for row in ROWS:
        trackers.log_row(row)
    assert kept.steps == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["broken: could not log round 1 (disk full); it gets no more rows this run"]


# --- bad input fails before training, naming the value and the fix ---


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("logging.report_to=[tensorbord]", r"unknown tracker 'tensorbord' in logging.report_to; choose from "
         r"tensorboard, wandb, mlflow"),
        ("logging.report_to=tensorboard", r"logging.report_to='tensorboard' must be a list.*\[tensorboard\]"),
    ],
)  # fmt: skip
def test_an_unknown_tracker_fails_config_validation_listing_the_valid_ones(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": override})


@pytest.mark.parametrize(
    ("tracker", "module", "command"),
    [
        ("tensorboard", "tensorboard", 'pip install "fedllm[tensorboard]"'),
        ("wandb", "wandb", 'pip install "fedllm[wandb]"'),
        ("mlflow", "mlflow", 'pip install "fedllm[mlflow]"'),
        ("mlflow", "sqlalchemy", 'pip install "fedllm[mlflow]"'),
    ],
)
def test_a_tracker_whose_package_is_missing_fails_with_the_pip_command(tmp_path, monkeypatch, tracker, module, command):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a package that is not installed
    with pytest.raises(ConfigError, match=rf"logging.report_to has {tracker} but {module} cannot be imported") as err:
        RunWriter(_config(tmp_path, f"logging.report_to=[{tracker}]"))
    assert command in str(err.value)


def test_an_unwritable_tracker_dir_fails_naming_logging_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"logging.dir='.*a-file/trackers' is not writable.*logging.dir=<a folder"):
        RunWriter(_config(tmp_path, "logging.report_to=[tensorboard]", f"logging.dir={blocker / 'trackers'}"))


def test_tracker_checks_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    from fedllm_app.server import run as run_module

    def no_model(*_):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(run_module, "get_model", no_model)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match='pip install "fedllm\\[wandb\\]"'):
        run_module.FederatedRun(_config(tmp_path, "logging.report_to=[wandb]"), started=0.0)

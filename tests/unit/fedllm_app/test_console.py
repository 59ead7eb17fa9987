"""The one logging path: fedllm's console lines, and third-party noise filtered unless verbose."""

import io
import logging
import warnings

import pytest

from fedllm_app import console


@pytest.fixture
def restored_loggers():
    """Put the fedllm and flwr loggers back as they were (setup_console changes them for the process)."""
    fed, flwr = logging.getLogger("fedllm"), logging.getLogger("flwr")
    saved = (list(fed.handlers), fed.level, fed.propagate, list(flwr.filters), flwr.level)
    yield
    fed.handlers[:], fed.level, fed.propagate, flwr.filters[:] = saved[0], saved[1], saved[2], saved[3]
    flwr.setLevel(saved[4])


def console_text(records: list[tuple[int, str]], monkeypatch) -> str:
    out = io.StringIO()
    monkeypatch.setattr(console.sys, "stdout", out)
    logging.getLogger("fedllm").handlers = []
    log = console.setup_console(verbose=True)
    for level, message in records:
        log.log(level, message)
    return out.getvalue()


def test_round_lines_keep_their_prefix_and_warnings_name_their_level(restored_loggers, monkeypatch):
    text = console_text([(logging.INFO, "fedavg round 1/2 | x"), (logging.WARNING, "node 3 failed")], monkeypatch)
    assert text == "[fedllm] fedavg round 1/2 | x\n[fedllm] WARNING: node 3 failed\n"


def test_a_table_is_printed_as_it_is(restored_loggers, monkeypatch):
    assert console_text([(logging.INFO, "\n| a | b |\n")], monkeypatch) == "\n| a | b |\n\n"


def test_setting_up_every_round_adds_one_handler(restored_loggers):
    for _ in range(3):
        console.setup_console()
    assert sum(getattr(h, "_fedllm", False) for h in logging.getLogger("fedllm").handlers) == 1


def flower_lines(verbose: bool) -> list[str]:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    flwr = logging.getLogger("flwr")
    keep = Keep()
    flwr.addHandler(keep)
    flwr.setLevel(logging.INFO)
    try:
        console.setup_console(verbose=verbose)
        flwr.info("configure_train: Sampled %s nodes (out of %s)", 4, 4)
        flwr.info("%s: Received %s results and %s failures", "aggregate_train", 4, 0)
        flwr.info("")
        flwr.warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        flwr.warning("Manually terminating %s", "ClientAppActor")
        flwr.info("Starting Flower Simulation")
        flwr.warning("Node 7 is unavailable")
    finally:
        flwr.removeHandler(keep)
    return seen


def test_flowers_per_round_lines_are_dropped_and_its_other_lines_kept(restored_loggers):
    assert flower_lines(verbose=False) == ["Starting Flower Simulation", "Node 7 is unavailable"]


def test_verbose_brings_flowers_per_round_lines_back(restored_loggers):
    assert len(flower_lines(verbose=True)) == 7


def warned(module: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_library_warnings()
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit("old", DeprecationWarning, "f.py", 2, module=module)
        warnings.warn_explicit("real problem", UserWarning, "f.py", 3, module=module)
    return [str(w.message) for w in caught]


def test_library_deprecations_are_quiet_but_other_warnings_and_our_own_show(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert warned("transformers.training_args") == ["real problem"]
    assert warned("ray._private.worker") == ["real problem"]
    assert warned("fedllm_app.client.trainer") == ["`x` is deprecated", "old", "real problem"]


def test_the_environment_variable_makes_everything_verbose(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert warned("transformers.training_args") == ["`x` is deprecated", "old", "real problem"]

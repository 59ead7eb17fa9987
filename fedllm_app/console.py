"""The one logging path: the ``fedllm`` logger on the console, third-party noise filtered unless verbose.

Every fedllm module logs to ``logging.getLogger("fedllm")`` (:data:`LOGGER`). :func:`setup_console`, called
by the ServerApp, the ClientApp and the command-line tools, gives that logger one handler on stdout that
prints ``[fedllm] <message>`` (``[fedllm] WARNING: <message>`` for warnings). Unless ``verbose``
(``logging.verbose=true`` in the run config, or ``FEDLLM_VERBOSE=1`` in the environment), it also quiets
what other libraries print on every round or in every worker, none of it a problem of the run:

- Flower's per-round INFO lines (``configure_train: Sampled ...``, ``aggregate_train: Received ...``), its
  "fraction_evaluate is set to 0.0" notice (fedllm evaluates on the server) and the "Manually terminating
  ClientAppActor" line each simulation worker prints when the run ends;
- deprecation notices (``FutureWarning``, ``DeprecationWarning``) raised inside torch, transformers, PEFT,
  TRL, datasets, accelerate, Ray, Flower and MLflow, and Ray's accelerator-variable tip; MLflow's and Alembic's
  INFO lines;
- transformers' per-process "Loading weights" bar and its info messages (``progress=False`` also turns off
  the datasets bars, for the ClientApp's workers).

Warnings of any other kind, and every error, still reach the console. A library used without
:func:`setup_console` (tests, notebooks) logs through ``fedllm`` to the root logger as usual.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER = "fedllm"
VERBOSE_ENV = "FEDLLM_VERBOSE"
# Libraries whose own deprecation notices are not the user's to act on.
NOISY_MODULES = r"(torch|transformers|peft|trl|datasets|accelerate|ray|flwr|huggingface_hub|mlflow)(\.|$)"
# Libraries whose INFO lines say nothing about the run (MLflow's and Alembic's "Creating initial tables...").
CHATTY_LOGGERS = ("mlflow", "alembic")
# Flower's INFO/WARNING lines that repeat every round (or every strategy) and say nothing about this run.
FLOWER_ROUND_NOISE = ("configure_train:", "aggregate_train:", "configure_evaluate:", "aggregate_evaluate:")
FLOWER_NOTICES = ("fraction_evaluate is set to 0.0", "Manually terminating ClientAppActor")

log = logging.getLogger(LOGGER)


class _ConsoleFormatter(logging.Formatter):
    """``[fedllm] message``; warnings and errors name their level; a block that starts on a new line
    (a table) is printed as it is.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if message.startswith("\n"):
            return message
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"[fedllm] {level}{message}"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a redirected or captured stdout included)."""

    _fedllm = True

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


class _DropFlowerRoundNoise(logging.Filter):
    """Drops Flower's per-round INFO lines (and its empty INFO lines) and its repeated notices; keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().strip()
        if record.levelno <= logging.INFO and (not message or message.startswith(FLOWER_ROUND_NOISE)):
            return False
        return not any(notice in message for notice in FLOWER_NOTICES)


def is_verbose(verbose: bool = False) -> bool:
    """``verbose``, or ``FEDLLM_VERBOSE`` set to 1/true/yes in the environment."""
    return verbose or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def quiet_library_warnings() -> None:
    """Ignore deprecation notices raised inside the libraries of :data:`NOISY_MODULES` (unless verbose).

    Call it before those libraries are imported: some warn at import time (torch's ``jit``). The
    ServerApp and ClientApp modules call it first thing.
    """
    if is_verbose():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's tip, printed at every ray.init
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)


def setup_console(verbose: bool = False, progress: bool = True) -> logging.Logger:
    """Give the ``fedllm`` logger its console handler and quiet third-party output unless verbose.

    Safe to call every round: the handler is added once, and the settings are applied again.

    Parameters
    ----------
    verbose : bool
        Show everything: Flower's per-round lines, library deprecations, loading bars, INFO of other libraries.
    progress : bool
        Keep the datasets download bars (the server and the CLIs); ``False`` in the ClientApp's workers.
    """
    verbose = is_verbose(verbose)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler(sys.stdout)
        handler.setFormatter(_ConsoleFormatter())
        log.addHandler(handler)
    _quiet_flower(verbose)
    if verbose:
        warnings.resetwarnings()
        return log
    quiet_library_warnings()
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _quiet_hugging_face(progress)
    return log


def _quiet_flower(verbose: bool) -> None:
    flower = logging.getLogger("flwr")
    flower.filters = [f for f in flower.filters if not isinstance(f, _DropFlowerRoundNoise)]
    if not verbose:
        flower.addFilter(_DropFlowerRoundNoise())


def _quiet_hugging_face(progress: bool) -> None:
    """transformers: errors only and no loading bars; datasets: no bars unless ``progress``."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if not progress:
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass

"""A simulation's Ray workers import the training libraries as they start, while the ServerApp starts.

In a ``flwr run`` simulation Flower creates its Ray workers (one per client slot) early, but a worker
imports the ClientApp, and with it torch, transformers, PEFT and TRL, only when its first message arrives:
after the ServerApp has loaded its model and data and evaluated the initial adapter. Round 1 then waits for
those imports (seconds of CPU each) while the server is idle. Ray runs a ``worker_process_setup_hook`` in
each worker process as it starts; Flower's simulation gives ``ray.init`` no way to set one, but Ray's driver
passes its runtime environment through the function named by the ``RAY_RUNTIME_ENV_HOOK`` environment
variable. :func:`enable` (called when the ClientApp module is imported, which Flower's simulation process
does before it starts Ray) names :func:`ray_runtime_env` there, and that adds :func:`preload` as the workers'
setup hook. The imports then overlap the ServerApp's start-up instead of following it.

Nothing here runs outside a simulation: a SuperNode's ClientApp process starts no Ray, and a hook the user
already set in ``RAY_RUNTIME_ENV_HOOK`` or in the runtime environment is kept. ``FEDLLM_PRELOAD=0`` turns the
preload off.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("fedllm")

HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"
SETUP_HOOK_KEY = "worker_process_setup_hook"
SWITCH_ENV = "FEDLLM_PRELOAD"


def enable() -> None:
    """Have a Ray driver started after this in the process give its workers :func:`preload` (unless
    ``FEDLLM_PRELOAD=0``, or ``RAY_RUNTIME_ENV_HOOK`` is already set).
    """
    if os.environ.get(SWITCH_ENV, "1") != "0":
        os.environ.setdefault(HOOK_ENV, f"{__name__}.{ray_runtime_env.__name__}")


def ray_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's runtime-environment hook: ``runtime_env`` with :func:`preload` as the workers' setup hook, unless
    it names a setup hook of its own.
    """
    env = dict(runtime_env or {})
    env.setdefault(SETUP_HOOK_KEY, f"{__name__}.{preload.__name__}")
    return env


def preload() -> None:
    """Import what a ClientApp round uses (torch, transformers' Auto classes, PEFT, TRL's trainers and datasets,
    fedllm's round with its trainer, model and data modules).

    Never raises: a worker whose setup hook fails is ended by Ray, and a library that cannot be imported fails
    the round itself, with the node's error.
    """
    start, cpu = time.perf_counter(), time.process_time()
    try:
        from fedllm_app.console import quiet_library_warnings

        quiet_library_warnings()  # before torch and transformers are imported, as the ClientApp module does
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

        import fedllm_app.client.round  # noqa: F401 - the round, the trainer, the model and data modules
    except Exception as err:  # noqa: BLE001 - the round reports an import error itself, with its cause
        log.warning("this Ray worker could not preload the training libraries (%s); its first round imports them", err)
        return
    log.debug("Ray worker preloaded the training libraries in %.1f s (%.1f s CPU)", time.perf_counter() - start,
              time.process_time() - cpu)  # fmt: skip

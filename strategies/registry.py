"""The fixed registry of strategy classes the server may build, and their scalar hyperparameters.

The server never hands a config dict to Hydra's ``instantiate``: whoever starts a run writes the
run config, and ``instantiate`` would build any ``_target_`` found in it (for instance a nested
``{_target_: pandas.read_pickle, ...}``). :func:`build` looks the strategy's ``_target_`` up in
:data:`STRATEGIES` and passes only the class's own keyword hyperparameters, each a plain
int, float, bool or string; the class's hyperparameter dataclass then checks the ranges.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from strategies.central import Central
from strategies.fedadagrad import FedAdagrad
from strategies.fedadam import FedAdam
from strategies.fedavg import FedAvgLoRA
from strategies.fedavgm import FedAvgM
from strategies.fedprox import FedProx
from strategies.fedyogi import FedYogi
from strategies.local import LocalOnly
from strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[FedAvgLoRA]] = {
    f"{cls.__module__}.{cls.__name__}": cls
    for cls in (FedAvgLoRA, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi, Scaffold, LocalOnly, Central)
}
SCALARS = (bool, int, float, str)


class StrategyConfigError(ValueError):
    """The strategy section names an unknown class or a hyperparameter it does not take."""


def hyperparameters(cls: type) -> set[str]:
    """The keyword-only parameters of ``cls.__init__`` and its bases' (FedAvgLoRA's run-wide ones included)."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        names |= {p.name for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return names


def build(section: dict[str, Any], wrap: Callable[[type], type] | None = None, **run_wide: Any) -> FedAvgLoRA:
    """The strategy ``section`` describes (``_target_`` + hyperparameters), with the run-wide arguments.

    ``wrap`` turns the registered class into the one built (clients of different LoRA ranks:
    :func:`strategies.hetero.with_lora_ranks`); it may raise a ValueError for a meaningless combination.
    """
    target = section.get("_target_")
    cls = STRATEGIES.get(str(target))
    if cls is None:
        raise StrategyConfigError(
            f"strategy._target_={target!r} is not one of fedllm's strategies: {sorted(STRATEGIES)}"
        )
    params = {k: v for k, v in section.items() if k != "_target_"}
    allowed = hyperparameters(cls) - set(run_wide)
    for key, value in params.items():
        if key not in allowed:
            raise StrategyConfigError(
                f"strategy.{key} is not a hyperparameter of {cls.__name__}; it takes {sorted(allowed) or 'none'}"
            )
        if not isinstance(value, SCALARS) and value is not None:
            raise StrategyConfigError(f"strategy.{key} must be a number, a boolean or a string, got {value!r}")
    return (wrap(cls) if wrap else cls)(**params, **run_wide)

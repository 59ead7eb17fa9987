"""Node policy: what a run may do on this SuperNode, decided by the node's owner, not by whoever starts runs.

Whoever can start a run on the SuperLink writes the run config; every ClientApp composes it. So the
ClientApp accepts from the run config only:

- the declared run-config keys and ``overrides`` whose keys are on :data:`CLIENT_OVERRIDE_KEYS`
  (hyperparameters, the choice of model, dataset, task, strategy and partition among the app's own
  ``conf/`` files), as plain ``key=value`` assignments: no ``+``/``++``/``~`` keys, no ``hydra.*``,
  no ``@package``, and no ``${...}`` interpolation anywhere in a value;
- never a local path or code-execution switch (:data:`NODE_ONLY_KEYS`: ``dataset.path``,
  ``dataset.hub_id``, ``model.name``, ``model.adapter``, ``model.trust_remote_code``). These come from the
  node's own config::

      flower-supernode ... --node-config "partition-id=0 num-partitions=2 data-path=/data/mine.jsonl
          model-path=/models/llama-2-7b trust-remote-code=false allowed-models='meta-llama/Llama-2-7b-hf'
          allowed-datasets='alpaca_gpt4,custom'"

  ``allowed-models`` / ``allowed-datasets`` (comma-separated ``model.name`` / ``dataset.name`` values)
  pin what the node serves; ``require-secagg=true`` makes it answer only secure-aggregation rounds (it
  refuses a plain train message, which would send its adapter in clear).
- never the exposure audit's canaries (``privacy.canaries.count > 0``, :mod:`fedllm_app.data.canaries`):
  they change the node's training data (random secrets written into its rows), so whoever starts runs
  must not turn them on; a node owner who audits their own deployment sets ``trust-run-config=true``.

A simulation, where one person owns every simulated node and the run config, keeps the run config's
local paths: the ClientApp runs inside Flower's simulation engine (:func:`in_simulation`), or the node
owner says so explicitly with ``trust-run-config=true`` in the node config.

Refusals raise :class:`PolicyError` with the details; the ClientApp logs them on the node and sends
the server only a short code (:func:`fedllm_app.client_app.train`).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig

from fedllm_app.config import GROUPS, OVERRIDES_KEY, RUN_CONFIG_KEYS, ConfigError, group_options, hydra_value

# Hydra keys (and their sub-keys) a run config may set on a node; everything else is refused.
CLIENT_OVERRIDE_KEYS = (
    *GROUPS,
    "seed",
    "num_rounds",
    "num_clients",
    "sample_clients",
    "save_every",
    "baseline",
    "round_timeout",
    "min_replies",
    "node_wait_timeout",
    "poll_interval",
    "output_dir",
    "run_name",
    "resume",
    "eval",
    "logging",
    "hub",
    "robust",
    "comm",
    "fault_injection",
    "lora_aggregation",
    "hetlora_weighting",
    "hetlora_average",
    "flexlora_average",
    "hetlora_prune",
    "hetlora_tail",
    "comm",  # the update codec and budget: the node encodes what it sends as the run asks
    "privacy",  # DP clipping and secure aggregation: the node clips and masks as the run asks
    "challenge",  # a FlowerTune preset (conf/challenge/): its choice is checked like a group's
)
# Config groups chosen by name; the choice must be one of the app's conf/<group>/ files.
CHOSEN_GROUPS = (*GROUPS, "challenge")
# Keys that name something on the node's disk or run code: set by the node config only (or a simulation).
NODE_ONLY_KEYS = ("dataset.path", "dataset.hub_id", "model.name", "model.adapter", "model.trust_remote_code")
DATA_PATH_KEY = "data-path"
MODEL_PATH_KEY = "model-path"
TRUST_REMOTE_CODE_KEY = "trust-remote-code"
ALLOWED_MODELS_KEY = "allowed-models"
REQUIRE_SECAGG_KEY = "require-secagg"
ALLOWED_DATASETS_KEY = "allowed-datasets"
TRUST_RUN_CONFIG_KEY = "trust-run-config"


class PolicyError(ConfigError):
    """The run config asks for something this node's policy refuses; the message names it (logged on the node)."""


def in_simulation() -> bool:
    """Whether this ClientApp runs inside Flower's simulation engine (a Ray actor), where one person owns all."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None or str(value).strip() == "":
        return None
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    return value is True or str(value).lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class NodePolicy:
    """The node owner's decisions, from its node config (see the module docstring)."""

    trust_run_config: bool = False
    data_path: str | None = None
    model_path: str | None = None
    trust_remote_code: bool = False
    allowed_models: tuple[str, ...] | None = None
    allowed_datasets: tuple[str, ...] | None = None
    require_secagg: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], simulation: bool | None = None) -> NodePolicy:
        simulation = in_simulation() if simulation is None else simulation
        return cls(
            trust_run_config=simulation or _flag(node_config, TRUST_RUN_CONFIG_KEY),
            data_path=str(node_config[DATA_PATH_KEY]) if node_config.get(DATA_PATH_KEY) else None,
            model_path=str(node_config[MODEL_PATH_KEY]) if node_config.get(MODEL_PATH_KEY) else None,
            trust_remote_code=_flag(node_config, TRUST_REMOTE_CODE_KEY),
            allowed_models=_names(node_config.get(ALLOWED_MODELS_KEY)),
            allowed_datasets=_names(node_config.get(ALLOWED_DATASETS_KEY)),
            require_secagg=_flag(node_config, REQUIRE_SECAGG_KEY),
        )

    def check_plain_round(self) -> None:
        """Raise a PolicyError if this node sends its update only under secure aggregation."""
        if self.require_secagg:
            raise PolicyError(
                f"this node's config sets {REQUIRE_SECAGG_KEY}=true and the server sent a plain train message "
                f"(the adapter would travel in clear); run with privacy.secagg=true"
            )

    def node_overrides(self) -> list[str]:
        """Overrides from the node config, applied after the run config's (so they win)."""
        out = [] if self.trust_run_config else [f"model.trust_remote_code={str(self.trust_remote_code).lower()}"]
        if self.trust_remote_code and self.trust_run_config:
            out.append("model.trust_remote_code=true")
        if self.model_path:
            out.append(f"model.name={hydra_value(self.model_path)}")
        return out

    def check_run_config(self, run_config: Mapping[str, Any]) -> None:
        """Raise a PolicyError naming the first key or value of the run config this node refuses."""
        for key, value in run_config.items():
            if isinstance(value, str) and "${" in value:
                raise PolicyError(f"run-config key {key!r} holds an interpolation ('${{...}}'), refused on this node")
        declared = {k.name for k in RUN_CONFIG_KEYS}
        for key in run_config:
            if key not in declared and key != OVERRIDES_KEY:
                raise PolicyError(f"run-config key {key!r} is not one of fedllm's declared keys")
        for key in RUN_CONFIG_KEYS:
            if key.target in GROUPS and run_config.get(key.name) not in (None, ""):
                self._check_group(key.target, str(run_config[key.name]))
        raw = str(run_config.get(OVERRIDES_KEY, "") or "")
        try:
            parsed = OverridesParser.create().parse_overrides(shlex.split(raw))
        except (OverrideParseException, ValueError):
            raise PolicyError("overrides are not plain Hydra key=value assignments") from None
        for override in parsed:
            self._check_override(override)

    def _check_override(self, o: Any) -> None:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            raise PolicyError(f"override {o.input_line!r}: only plain key=value assignments are accepted (no + ~ @)")
        if key == "hydra" or key.startswith("hydra."):
            raise PolicyError(f"override {o.input_line!r}: hydra.* keys are refused on this node")
        if _under(key, NODE_ONLY_KEYS):
            if not self.trust_run_config:
                raise PolicyError(
                    f"override {o.input_line!r}: {key} is set by the node's own config on this node "
                    f"(data-path, model-path, trust-remote-code), not by the run config"
                )
            return
        if not _under(key, CLIENT_OVERRIDE_KEYS):
            raise PolicyError(f"override {o.input_line!r}: {key} is not a key a run may set on this node")
        if key in CHOSEN_GROUPS:
            self._check_group(key, str(o.value()))

    @staticmethod
    def _check_group(group: str, value: str) -> None:
        if value not in group_options(group):
            raise PolicyError(f"{group}={value!r} is not one of the app's {group} choices")

    def check_config(self, cfg: DictConfig) -> None:
        """The composed config against the node's pins (allowed models and datasets) and its training data."""
        canaries = int(((cfg.get("privacy") or {}).get("canaries") or {}).get("count", 0))
        if canaries and not self.trust_run_config:
            raise PolicyError(
                f"privacy.canaries.count={canaries} would write canary rows into this node's training data (an "
                f"exposure audit for simulations); refused unless the node config sets {TRUST_RUN_CONFIG_KEY}=true"
            )
        if self.allowed_models is not None and str(cfg.model.name) not in self.allowed_models:
            raise PolicyError(f"model {cfg.model.name!r} is not in this node's allowed-models {self.allowed_models}")
        if self.allowed_datasets is not None and str(cfg.dataset.name) not in self.allowed_datasets:
            raise PolicyError(
                f"dataset {cfg.dataset.name!r} is not in this node's allowed-datasets {self.allowed_datasets}"
            )


def _under(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)

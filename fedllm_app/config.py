"""The one bridge from Flower's run config to the composed Hydra config.

Flower's run config sets the most used options through declared kebab-case keys
(:data:`RUN_CONFIG_KEYS`, the one table of them; ``[tool.flwr.app.config]`` declares the
same keys) and any Hydra key through the string key ``overrides``::

    flwr run . --run-config "num-server-rounds=3 strategy='fedprox' overrides='training.grad_accum=2'"

A declared key left at its ``""`` default is unset: Hydra's default (``conf/``) applies.
:func:`load_config` composes ``conf/config.yaml`` with both and validates the result, so a
bad value fails at start with a sentence that names it and the fix.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from fedllm_app.comm.codecs import CodecError, CommParams

OVERRIDES_KEY = "overrides"
# The default of every declared run-config key: not given, so Hydra's default applies.
UNSET = ""
GROUPS = ("model", "dataset", "partition", "task", "strategy", "training")
TASKS = ("sft", "dpo")
BASELINES = ("local", "none")
QUANTIZATIONS = (None, "4bit", "4bit-fp4", "8bit")
DTYPES = ("float32", "bfloat16", "float16")
# accelerate's device_map strategies (model.device_map); null = the client's one device.
DEVICE_MAPS = (None, "auto", "balanced", "balanced_low_0", "sequential")
TEMPLATE_NAMES = ("alpaca", "vicuna", "chat")
# Tests and the robustness benchmark only: the ways a client can corrupt its reply (fault_injection; applied
# by fedllm_app.client.faults). scale and signflip are model-poisoning attacks on a sound-looking update.
FAULT_KINDS = ("names", "shape", "nan", "inf", "zero_examples", "negative_examples", "scale", "signflip")
_FAULT_ENTRY = re.compile(r"^([a-z_]+)-(?:r(\d+)|every)-p(\d+)$")
EVERY_ROUND = 0  # the round of a fault_injection entry <kind>-every-p<partition>
# lora_aggregation and hetlora_weighting (strategies.hetero.AGGREGATIONS, strategies.hetero_rank.WEIGHTINGS; a test
# keeps them equal: config is imported by evaluation, which never imports the strategies).
AGGREGATIONS = ("homogeneous", "hetlora", "flexlora")
WEIGHTINGS = ("norm", "examples")
HETLORA_AVERAGES = ("zero_padded", "per_rank")
FLEXLORA_AVERAGES = ("products", "updates")
HETLORA_TAILS = ("none", "frozen", "frozen_sum")
# logging.report_to: the experiment trackers (fedllm_app.server.trackers implements one class per name).
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")
# privacy.accountant (strategies.accounting.ACCOUNTANTS; a test keeps them equal, as AGGREGATIONS).
DP_ACCOUNTANTS = ("rdp", "pld")
# privacy.noise (strategies.privacy.NOISE_PLACEMENTS; a test keeps them equal).
DP_NOISE_PLACEMENTS = ("server", "distributed")
# privacy.canaries.method (how evaluation/exposure.py finds a canary's rank) and the longest secret (10^9
# candidates: Carlini et al.'s own 9-digit canaries).
CANARY_METHODS = ("auto", "exact", "estimate")
MAX_CANARY_DIGITS = 9
# hub.repo_id: <user or org>/<name>, or <name> in the token's own namespace.
_HUB_REPO_ID = re.compile(r"^([\w.-]+/)?[\w.-]+$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class RunConfigKey:
    """A Flower run-config key declared in ``[tool.flwr.app.config]`` and the Hydra key it sets."""

    name: str  # kebab-case, as Flower apps name their run-config keys
    target: str  # the Hydra key (or config group) it sets
    kind: type  # the value type it accepts: int, float, bool or str
    example: str  # a value as typed in --run-config (strings quoted, as Flower requires)
    meaning: str


RUN_CONFIG_KEYS: tuple[RunConfigKey, ...] = (
    RunConfigKey("num-server-rounds", "num_rounds", int, "3", "federated rounds"),
    RunConfigKey(
        "num-clients", "num_clients", int, "4", "clients (SuperNodes); unset in a simulation: as many as it simulates"
    ),
    RunConfigKey("sample-clients", "sample_clients", int, "2", "clients sampled each round (default: all)"),
    RunConfigKey("strategy", "strategy", str, "'fedprox'", "FL algorithm or baseline (`conf/strategy/`)"),
    RunConfigKey("model", "model", str, "'llama2-7b'", "base model (`conf/model/`)"),
    RunConfigKey("dataset", "dataset", str, "'alpaca_gpt4'", "dataset (`conf/dataset/`)"),
    RunConfigKey("task", "task", str, "'dpo'", "`sft` or `dpo`"),
    RunConfigKey(
        "partition", "partition", str, "'dirichlet'", "how the data is split over clients (`conf/partition/`)"
    ),
    RunConfigKey("seed", "seed", int, "7", "seed of data, sampling and model initialisation"),
    RunConfigKey("local-steps", "training.max_steps", int, "10", "optimizer steps per client and round"),
    RunConfigKey(
        "learning-rate",
        "training.learning_rate",
        float,
        "2e-3",
        "peak learning rate (cosine down to `training.min_learning_rate`)",
    ),
    RunConfigKey("lora-r", "model.lora.r", int, "16", "LoRA rank"),
    RunConfigKey("baseline", "baseline", str, "'none'", "`local`: also train each client alone; `none`: skip"),
    RunConfigKey("output-dir", "output_dir", str, "'outputs'", "folder for the run's outputs"),
    RunConfigKey("run-name", "run_name", str, "'my-run'", "the run's folder in output-dir"),
    RunConfigKey("verbose", "logging.verbose", bool, "true", "show Flower's and the libraries' own output too"),
)
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a quoted string"}


def conf_dir() -> Path:
    """Hydra's config folder: ``$FEDLLM_CONF_DIR``, else the copy installed inside the package (a wheel:
    ``fedllm_app/conf``), else ``conf/`` beside the package (a source checkout or a Flower app bundle).
    """
    env = os.environ.get("FEDLLM_CONF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if (installed / "config.yaml").is_file() else here.parent / "conf"


def group_options(group: str) -> list[str]:
    """The choices of a config group (its YAML files, without extension)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def load_config(run_config: Mapping[str, Any] | None = None, extra: list[str] | None = None) -> DictConfig:
    """Compose the Hydra config from Flower's run config (and optional extra overrides, applied last)."""
    return compose_config(tuple(hydra_overrides(run_config or {})) + tuple(extra or ()))


def hydra_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a Flower run config asks for: its set declared keys, then ``overrides``.

    The one place a run-config key becomes a Hydra key (through :data:`RUN_CONFIG_KEYS`).
    A key given both ways with different values is a ConfigError naming both.
    """
    given = {key: _typed(key, run_config[key.name]) for key in RUN_CONFIG_KEYS if _is_set(run_config, key.name)}
    raw = str(run_config.get(OVERRIDES_KEY, "") or "")
    user = shlex.split(raw)
    parsed = {o.key_or_group: o for o in _parse_overrides(user, raw)}
    _check_plain(run_config, parsed)
    for key, value in given.items():
        other = parsed.get(key.target)
        if other is not None and (other.is_delete() or other.value() != value):
            raise ConfigError(
                f"run-config key {key.name}={value!r} and {other.input_line!r} in overrides set {key.target} to "
                f"different values; give it once: drop {other.input_line!r} from overrides or unset {key.name}"
            )
    return [f"{key.target}={hydra_value(value)}" for key, value in given.items()] + user


def _check_plain(run_config: Mapping[str, Any], parsed: Mapping[str, Any]) -> None:
    """A run config is data, written by whoever starts the run: no interpolation (``${oc.env:...}`` would read
    the environment of the process composing it) and no ``hydra.*`` keys (``hydra.searchpath`` reads its files).
    """
    for name, value in run_config.items():
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"run-config key {name!r} holds an interpolation ('${{...}}'); the run config takes plain values only"
            )
    for key in parsed:
        if key == "hydra" or key.startswith("hydra."):
            raise ConfigError(f"overrides set {key!r}; hydra.* keys cannot be set from the run config")


def user_set_keys(run_config: Mapping[str, Any]) -> set[str]:
    """The Hydra keys (and groups) the run config sets, by a declared key or in ``overrides``."""
    raw = str(run_config.get(OVERRIDES_KEY, "") or "")
    from_keys = {key.target for key in RUN_CONFIG_KEYS if _is_set(run_config, key.name)}
    return from_keys | {o.key_or_group for o in _parse_overrides(shlex.split(raw), raw)}


def _is_set(run_config: Mapping[str, Any], name: str) -> bool:
    return name in run_config and run_config[name] != UNSET


def _typed(key: RunConfigKey, value: Any) -> Any:
    """The value if it is of the key's kind (an int is a valid float); else a ConfigError naming it."""
    ok = isinstance(value, key.kind) and not (key.kind is int and isinstance(value, bool))
    if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ConfigError(
            f"run-config key {key.name}={value!r} must be {_KINDS[key.kind]}; e.g. --run-config "
            f'"{key.name}={key.example}"'
        )
    return value


def hydra_value(value: Any) -> str:
    """A run-config value as a Hydra override value: strings quoted (so '7' or 'null' stay strings)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):  # Hydra's quoting: \' is a quote, and backslashes before a quote are doubled
        return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"
    return str(value)


def _parse_overrides(overrides: list[str], raw: str) -> list[Any]:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(
            f"overrides={raw!r} is not valid Hydra override syntax ({str(err).splitlines()[0]}); "
            f"write key=value pairs, e.g. overrides='num_rounds=3 training.max_steps=10'"
        ) from None


def run_config_table() -> str:
    """The declared run-config keys as the README's Markdown table (a test keeps the README equal to it)."""
    rows = ["| run-config key | sets | e.g. | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k.name}` | `{k.target}` | `{k.name}={k.example}` | {k.meaning} |" for k in RUN_CONFIG_KEYS]
    return "\n".join(rows)


@lru_cache(maxsize=8)
def compose_config(overrides: tuple[str, ...]) -> DictConfig:
    """Compose and validate; cached because every client round calls it."""
    try:
        with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
            cfg = compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as err:
        raise ConfigError(_missing_option_message(err)) from None
    except ConfigCompositionException as err:
        raise ConfigError(_composition_message(err, overrides)) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _missing_option_message(err: MissingConfigException) -> str:
    match = re.search(r"Could not find '([\w-]+)/([^']+)'", str(err))
    if match:
        group, bad = match.groups()
        options = group_options(group)
        return f"unknown {group} {bad!r}; choose one of: {', '.join(options)} (e.g. {group}={options[0]})"
    return str(err)


def _composition_message(err: ConfigCompositionException, overrides: tuple[str, ...]) -> str:
    text = str(err) + " " + str(err.__cause__ or "")
    match = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    key = match.group(1) if match else "?"
    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        base = compose(config_name="config")
    # The deepest existing parent of the bad key: 'traning.lr' is bad at the top level.
    parts = key.split(".")
    depth = 0
    while depth < len(parts) - 1 and isinstance(OmegaConf.select(base, ".".join(parts[: depth + 1])), DictConfig):
        depth += 1
    parent = ".".join(parts[:depth]) or None
    key = ".".join(parts[: depth + 1]) if depth + 1 < len(parts) else key
    node = OmegaConf.select(base, parent) if parent else base
    valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    where = f"in '{parent}'" if parent else "at the top level"
    return (
        f"unknown config key {key!r} (from overrides {list(overrides)}); "
        f"valid keys {where}: {', '.join(map(str, valid))}. "
        f"To add a new key use '+{key}=...'"
    )


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Check values that Hydra cannot: ranges, relations, paths."""
    _check(cfg.num_rounds >= 1, f"num_rounds={cfg.num_rounds} must be at least 1; e.g. num_rounds=10")
    _check(cfg.num_clients >= 1, f"num_clients={cfg.num_clients} must be at least 1; e.g. num_clients=4")
    _check(
        1 <= cfg.sample_clients <= cfg.num_clients,
        f"sample_clients={cfg.sample_clients} must be between 1 and num_clients={cfg.num_clients}; "
        f"lower sample_clients or raise num_clients",
    )
    _check(cfg.save_every >= 1, f"save_every={cfg.save_every} must be at least 1; e.g. save_every=5")
    _check(cfg.round_timeout > 0, f"round_timeout={cfg.round_timeout} must be positive (seconds)")
    _check(
        1 <= cfg.min_replies <= cfg.sample_clients,
        f"min_replies={cfg.min_replies} must be between 1 and sample_clients={cfg.sample_clients}",
    )
    _check(cfg.node_wait_timeout > 0, f"node_wait_timeout={cfg.node_wait_timeout} must be positive (seconds)")
    parse_faults(cfg.fault_injection)
    _check(cfg.poll_interval > 0, f"poll_interval={cfg.poll_interval} must be positive (seconds); e.g. 0.05")
    _check(cfg.baseline in BASELINES, f"baseline={cfg.baseline!r} is not one of {', '.join(BASELINES)}")
    _check(bool(cfg.strategy.get("name")), "strategy.name is missing; every strategy file must set name")
    t = cfg.training
    _check(
        t.template in TEMPLATE_NAMES,
        f"unknown template {t.template!r}; set training.template to one of {', '.join(TEMPLATE_NAMES)}",
    )
    for key in ("batch_size", "grad_accum", "max_steps", "max_length", "eval_batch_size", "max_new_tokens"):
        _check(t[key] >= 1, f"training.{key}={t[key]} must be at least 1")
    _check(t.learning_rate > 0, f"training.learning_rate={t.learning_rate} must be positive; e.g. 5e-5")
    _check(
        0 <= t.min_learning_rate <= t.learning_rate,
        f"training.min_learning_rate={t.min_learning_rate} must be between 0 and "
        f"training.learning_rate={t.learning_rate}",
    )
    _validate_data(cfg)
    _validate_reporting(cfg)
    _validate_secagg(cfg)
    _validate_dp(cfg)
    _validate_canaries(cfg)
    _validate_comm(cfg)
    m = cfg.model
    adapter = m.get("adapter")
    _check(
        not adapter or Path(str(adapter)).expanduser().is_dir(),
        f"model.adapter={adapter!r} is not a directory; give a checkpoint folder of an earlier run "
        f"(outputs/<run>/checkpoints/round-<N>) or model.adapter=null",
    )
    _check(
        m.quantization in QUANTIZATIONS, f"model.quantization={m.quantization!r} must be null, 4bit, 4bit-fp4 or 8bit"
    )
    _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r} must be one of {', '.join(DTYPES)}")
    _check(
        m.get("device_map") in DEVICE_MAPS,
        f"model.device_map={m.get('device_map')!r} must be null (one device) or one of "
        f"{', '.join(str(d) for d in DEVICE_MAPS[1:])} (accelerate spreads the model over the client's GPUs)",
    )
    _check(m.lora.r >= 1, f"model.lora.r={m.lora.r} must be at least 1; e.g. model.lora.r=16")
    _validate_lora_ranks(cfg)
    name = str(m.name)
    if _looks_like_path(name):
        _check(
            Path(name).expanduser().is_dir(),
            f"model.name={name!r} is not a directory; give a local folder saved with save_pretrained, "
            f"a Hub id such as meta-llama/Llama-2-7b-hf, or builtin:tiny",
        )


def _validate_comm(cfg: DictConfig) -> None:
    """The ``comm`` section: codec names, top-k fraction, block size, budget (:class:`CommParams`)."""
    try:
        CommParams.from_config(cfg.get("comm"))
    except CodecError as err:
        raise ConfigError(str(err)) from None
    except TypeError as err:  # an unknown key inside comm
        raise ConfigError(f"comm: {err}; the comm keys are those of conf/config.yaml") from None


def _validate_data(cfg: DictConfig) -> None:
    """Task, partition and dataset values that need no data to check."""
    task = cfg.task
    _check(task.name in TASKS, f"task.name={task.name!r} must be one of {', '.join(TASKS)} (task=sft or task=dpo)")
    if task.name == "dpo":
        _check(task.beta > 0, f"task.beta={task.beta} must be positive; e.g. task.beta=0.1")
    p = cfg.partition
    if p.name == "dirichlet":
        _check(p.alpha > 0, f"partition.alpha={p.alpha} must be positive; e.g. partition.alpha=0.5")
    if p.name == "dominance":
        _check(0 < p.dominance <= 1, f"partition.dominance={p.dominance} must be in (0, 1]; e.g. 0.9")
    if p.name == "pathological":
        _check(p.classes_per_client >= 1, f"partition.classes_per_client={p.classes_per_client} must be at least 1")
    d = cfg.dataset
    if d.get("sample") is not None:
        _check(d.sample >= 1, f"dataset.sample={d.sample} must be at least 1 (or null for every row)")
    if d.get("heldout") is not None:
        _check(d.heldout >= 1, f"dataset.heldout={d.heldout} must be at least 1 (the server evaluates on it)")


def _validate_lora_ranks(cfg: DictConfig) -> None:
    """``lora_aggregation``, ``hetlora_weighting``, ``hetlora_average``, ``flexlora_average`` and
    ``model.lora.client_ranks`` (each rank in 1..model.lora.r).
    """
    method, lora = cfg.get("lora_aggregation", "homogeneous"), cfg.model.lora
    _check(
        method in AGGREGATIONS,
        f"lora_aggregation={method!r} must be one of {', '.join(AGGREGATIONS)}; e.g. lora_aggregation=hetlora",
    )
    weighting = cfg.get("hetlora_weighting", "norm")
    _check(
        weighting in WEIGHTINGS,
        f"hetlora_weighting={weighting!r} must be one of {', '.join(WEIGHTINGS)}; e.g. hetlora_weighting=norm",
    )
    average = cfg.get("hetlora_average", "zero_padded")
    _check(
        average in HETLORA_AVERAGES,
        f"hetlora_average={average!r} must be one of {', '.join(HETLORA_AVERAGES)}; e.g. hetlora_average=per_rank",
    )
    flex = cfg.get("flexlora_average", "products")
    _check(
        flex in FLEXLORA_AVERAGES,
        f"flexlora_average={flex!r} must be one of {', '.join(FLEXLORA_AVERAGES)}; e.g. flexlora_average=updates",
    )
    _validate_prune(cfg, method)
    _validate_tail(cfg, method)
    ranks = lora.get("client_ranks") or []
    _check(
        OmegaConf.is_list(ranks) or ranks == [],
        f"model.lora.client_ranks={ranks!r} must be a list of ranks; e.g. model.lora.client_ranks=[4,8,16,32]",
    )
    for rank in ranks:
        _check(
            isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= lora.r,
            f"model.lora.client_ranks={list(ranks)} holds {rank!r}, outside 1..model.lora.r={lora.r} (the global "
            f"adapter's rank, r_max); lower it or raise model.lora.r to at least {max(ranks, default=lora.r)}",
        )
    _check(
        method != "homogeneous" or all(r == lora.r for r in ranks),
        f"model.lora.client_ranks={list(ranks)} differ from model.lora.r={lora.r} but lora_aggregation=homogeneous "
        f"trains every client at model.lora.r; set lora_aggregation=hetlora or flexlora, or model.lora.client_ranks=[]",
    )
    _check(
        method == "homogeneous" or not cfg.model.get("adapter"),
        f"model.adapter={cfg.model.get('adapter')!r} with lora_aggregation={method}: starting clients of different "
        f"ranks from a saved adapter is not supported; set model.adapter=null or lora_aggregation=homogeneous",
    )


def _validate_tail(cfg: DictConfig, method: str) -> None:
    """``hetlora_tail``: one of :data:`HETLORA_TAILS`; ``frozen`` only with what it combines with
    (:class:`strategies.hetero.HeteroRankParams` checks the same; a codec's delta would be of the whole global).
    """
    tail = cfg.get("hetlora_tail", "none")
    _check(
        tail in HETLORA_TAILS,
        f"hetlora_tail={tail!r} must be one of {', '.join(HETLORA_TAILS)}; e.g. hetlora_tail=frozen",
    )
    if tail == "none":
        return
    codec = (cfg.get("comm") or {}).get("codec", "none")
    for bad, what, fix in (
        (method != "hetlora", f"lora_aggregation={method}", "lora_aggregation=hetlora"),
        ((cfg.get("hetlora_prune") or {}).get("enabled", False), "hetlora_prune.enabled=true",
         "hetlora_prune.enabled=false"),
        (cfg.get("hetlora_average", "zero_padded") != "zero_padded", f"hetlora_average={cfg.get('hetlora_average')}",
         "hetlora_average=zero_padded"),
        (codec != "none", f"comm.codec={codec} (its delta is against the whole global, the reply is r_k ranks)",
         "comm.codec=none"),
    ):  # fmt: skip
        _check(
            not bad,
            f"hetlora_tail={tail} cannot run with {what}: the frozen tail is its own way to send, train and "
            f"aggregate HetLoRA's ranks; set {fix} or hetlora_tail=none",
        )


def _validate_prune(cfg: DictConfig, method: str) -> None:
    """``hetlora_prune``: the bounds of :class:`strategies.hetero_rank.PruneParams` (checked here too, as config
    may not import the strategies; a test keeps them equal), and on only with hetlora.
    """
    p = cfg.get("hetlora_prune") or {}
    unknown = sorted(set(p) - {"enabled", "decay", "weight", "threshold"})
    _check(not unknown, f"hetlora_prune has unknown keys {unknown}; its keys are enabled, decay, weight, threshold")
    enabled = p.get("enabled", False)
    _check(isinstance(enabled, bool), f"hetlora_prune.enabled={enabled!r} must be true or false")
    for key, ok, bound, example in (
        ("decay", lambda v: 0 < v < 1, "in (0, 1)", 0.9),
        ("weight", lambda v: v >= 0, ">= 0", 0.01),
        ("threshold", lambda v: v > 0, "positive", 1.0),
    ):
        value = p.get(key, example)
        _check(
            isinstance(value, int | float) and not isinstance(value, bool) and ok(value),
            f"hetlora_prune.{key}={value!r} must be a number {bound}; e.g. hetlora_prune.{key}={example}",
        )
    _check(
        not enabled or method == "hetlora",
        f"hetlora_prune.enabled=true with lora_aggregation={method}: rank self-pruning is HetLoRA's; set "
        f"lora_aggregation=hetlora (with model.lora.client_ranks or node ranks) or hetlora_prune.enabled=false",
    )


def _validate_reporting(cfg: DictConfig) -> None:
    """``logging.report_to`` names and ``hub.*`` values; packages, folders and the Hub token are checked when
    the run starts (:mod:`fedllm_app.server.trackers`, :mod:`fedllm_app.server.hub`).
    """
    report_to = cfg.logging.report_to
    _check(
        OmegaConf.is_list(report_to),
        f"logging.report_to={report_to!r} must be a list of trackers; e.g. logging.report_to=[{report_to}]",
    )
    for name in report_to:
        _check(
            name in TRACKER_NAMES,
            f"unknown tracker {name!r} in logging.report_to; choose from {', '.join(TRACKER_NAMES)} "
            f"(e.g. logging.report_to=[tensorboard])",
        )
    hub = cfg.hub
    if hub.push:
        _check(
            bool(hub.repo_id),
            "hub.push=true needs hub.repo_id; set hub.repo_id=<user or org>/<name> or hub.push=false",
        )
        _check(
            bool(_HUB_REPO_ID.match(str(hub.repo_id))),
            f"hub.repo_id={hub.repo_id!r} is not a Hub repository id; use <user or org>/<name>, e.g. "
            f"hub.repo_id=alice/fedllm-adapter",
        )
        _check(
            cfg.strategy.name != "local",
            "hub.push=true with strategy=local: each client keeps its own adapter and there is no global one "
            "to push; set hub.push=false or choose a federated strategy",
        )


def _validate_secagg(cfg: DictConfig) -> None:
    """``privacy.secagg_*`` values, and the settings secure aggregation cannot hold with (the server sees only
    the sum of the updates, never one of them).
    """
    p = cfg.get("privacy") or {}
    if not p.get("secagg", False):
        return
    fix = "or set privacy.secagg=false"
    _check(
        cfg.strategy.name not in ("central", "local"),
        f"privacy.secagg=true with strategy={cfg.strategy.name}: there is no sum of client updates to protect; "
        f"choose a federated strategy {fix}",
    )
    aggregator = cfg.strategy.get("aggregator", "mean")
    _check(
        aggregator == "mean",
        f"privacy.secagg=true with strategy.aggregator={aggregator}: a robust aggregator needs each client's "
        f"update, which secure aggregation hides; set strategy.aggregator=mean {fix}",
    )
    method = cfg.get("lora_aggregation", "homogeneous")
    _check(
        method == "homogeneous",
        f"privacy.secagg=true with lora_aggregation={method}: clients of different ranks cannot be summed "
        f"under masks; set lora_aggregation=homogeneous {fix}",
    )
    codec = (cfg.get("comm") or {}).get("codec", "none")
    _check(
        codec == "none",
        f"privacy.secagg=true with comm.codec={codec}: the masked updates are field elements that no codec can "
        f"compress; set comm.codec=none {fix}",
    )
    downlink = (cfg.get("comm") or {}).get("downlink")
    _check(
        downlink in (None, "none"),
        f"privacy.secagg=true with comm.downlink={downlink}: secure aggregation sends the global adapter as it is; "
        f"set comm.downlink=null {fix}",
    )
    delta = (cfg.get("comm") or {}).get("downlink_delta", False)
    _check(
        not delta,
        f"privacy.secagg=true with comm.downlink_delta=true: secure aggregation sends the global adapter as it is; "
        f"set comm.downlink_delta=false {fix}",
    )
    _check(cfg.sample_clients >= 2, f"privacy.secagg=true needs sample_clients >= 2, got {cfg.sample_clients} {fix}")
    neighbours = p.get("secagg_neighbours")
    _check(
        neighbours is None or (isinstance(neighbours, int) and not isinstance(neighbours, bool) and neighbours >= 2),
        f"privacy.secagg_neighbours={neighbours!r} must be an integer >= 2 or null (2 ceil(log2 n))",
    )
    threshold = p.get("secagg_threshold", 0.667)
    if isinstance(threshold, int) and not isinstance(threshold, bool):
        size = secagg_degree(cfg.sample_clients, neighbours) + 1
        _check(
            size < 2 * threshold and threshold <= size,
            f"privacy.secagg_threshold={threshold} shares must be more than half of and at most the {size} clients "
            f"of each neighbourhood (sample_clients={cfg.sample_clients}, privacy.secagg_neighbours={neighbours}); "
            f"set it in {size // 2 + 1}..{size}, or a fraction such as privacy.secagg_threshold=0.667",
        )
    else:
        _check(
            isinstance(threshold, float) and 0.5 < threshold <= 1,
            f"privacy.secagg_threshold={threshold!r} must be a fraction in (0.5, 1] of each neighbourhood or a "
            f"count >= 2; e.g. privacy.secagg_threshold=0.667",
        )
    clip = p.get("secagg_clip_range", 1.0)
    _check(clip > 0, f"privacy.secagg_clip_range={clip} must be positive; e.g. privacy.secagg_clip_range=1.0")
    bits = p.get("secagg_bits", 32)
    _check(
        isinstance(bits, int) and 16 <= bits <= 53,
        f"privacy.secagg_bits={bits} must be in 16..53 (quantisation levels are exact in float64 only up to "
        f"2^53); e.g. privacy.secagg_bits=32",
    )


def secagg_degree(n: int, neighbours: int | None) -> int:
    """Neighbours of each of ``n`` secure-aggregation clients: ``neighbours`` or ``2 ceil(log2 n)``, made
    even, and ``n - 1`` (the full graph) when that reaches it. The same as ``SecAggParams.degree``.
    """
    k = neighbours if neighbours is not None else 2 * math.ceil(math.log2(max(n, 2)))
    return n - 1 if k >= n - 1 else k + (k % 2)


def _validate_dp(cfg: DictConfig) -> None:
    """``privacy.*`` DP settings that cannot hold fail here, before training (docs/privacy.md)."""
    p = cfg.get("privacy") or {}
    if not p.get("dp", False):
        return
    z, target = p.get("noise_multiplier"), p.get("target_epsilon")
    _check(p.clip_norm > 0, f"privacy.clip_norm={p.clip_norm} must be positive; e.g. privacy.clip_norm=1.0")
    _check(
        z is not None or target is not None,
        "privacy.noise_multiplier=null needs privacy.target_epsilon to derive it from; set one of them",
    )
    _check(z is None or z > 0, f"privacy.noise_multiplier={z} must be positive; e.g. privacy.noise_multiplier=1.0")
    _check(target is None or target > 0, f"privacy.target_epsilon={target} must be positive (or null); e.g. 8")
    _check(0 < p.delta < 1, f"privacy.delta={p.delta} must be in (0, 1), below 1/num_clients; e.g. 1e-5")
    _check(
        p.accountant in DP_ACCOUNTANTS,
        f"privacy.accountant={p.accountant!r} must be one of {', '.join(DP_ACCOUNTANTS)}; e.g. privacy.accountant=rdp",
    )
    _check(
        cfg.strategy.name not in ("central", "local"),
        f"privacy.dp=true with strategy={cfg.strategy.name}: DP-FedAvg noises the mean of the clients' updates, "
        f"which {cfg.strategy.name} does not compute; choose a federated strategy or set privacy.dp=false",
    )
    _check(
        cfg.strategy.get("aggregator", "mean") == "mean",
        f"privacy.dp=true with strategy.aggregator={cfg.strategy.get('aggregator')}: the noise is calibrated to the "
        f"mean of clipped updates, not to a robust rule; set strategy.aggregator=mean (clipping already bounds "
        f"each client) or privacy.dp=false",
    )
    _check(
        cfg.get("lora_aggregation", "homogeneous") == "homogeneous",
        f"privacy.dp=true with lora_aggregation={cfg.lora_aggregation}: its rank-wise weights and SVD change the "
        f"sensitivity the noise covers; set lora_aggregation=homogeneous or privacy.dp=false",
    )
    _check(
        cfg.baseline == "none",
        "privacy.dp=true with baseline=local: the local-only baseline sends each client's own un-noised adapter "
        "to the server; set baseline=none",
    )
    _check(
        0 < p.target_quantile < 1 and p.clip_lr > 0,
        f"privacy.target_quantile={p.target_quantile} must be in (0, 1) and privacy.clip_lr={p.clip_lr} positive",
    )
    _validate_distributed_noise(cfg)
    # A target_epsilon already exceeded by round 1 is refused by the server when it builds the strategy
    # (fedllm_app.server.run.dp_settings): the accountant lives in strategies, which config may not import.


def _validate_distributed_noise(cfg: DictConfig) -> None:
    """``privacy.noise`` and, for distributed noise, what it needs: secure aggregation, fixed clipping, and an
    honest share left when ``noise_colluders`` clients collude (t - c >= 1 for the smallest threshold t a round
    may use). The quantiser's range is checked where z is known (:func:`fedllm_app.server.run.dp_settings`).
    """
    p = cfg.privacy
    noise = p.get("noise", "server")
    _check(
        noise in DP_NOISE_PLACEMENTS,
        f"privacy.noise={noise!r} must be one of {', '.join(DP_NOISE_PLACEMENTS)}; e.g. privacy.noise=server",
    )
    if noise != "distributed":
        return
    _check(
        bool(p.get("secagg", False)),
        "privacy.noise=distributed needs privacy.secagg=true: without masks the server would see each client's "
        "update with only its own small share of the noise; set privacy.secagg=true or privacy.noise=server",
    )
    _check(
        not p.adaptive_clip,
        "privacy.noise=distributed with privacy.adaptive_clip=true: the clipped count's noise is the server's to "
        "add; set privacy.adaptive_clip=false or privacy.noise=server",
    )
    colluders = p.get("noise_colluders", 0)
    _check(_int(colluders) and colluders >= 0, f"privacy.noise_colluders={colluders!r} must be an integer >= 0")
    threshold = p.get("secagg_threshold", 0.667)
    smallest = threshold if _int(threshold) else 2  # a fraction gives t = 2 in a round of 2 clients
    _check(
        smallest - colluders >= 1,
        f"privacy.noise_colluders={colluders} leaves no honest noise share in a round of threshold t={smallest} "
        f"(privacy.secagg_threshold={threshold}{'' if _int(threshold) else ': 2 shares when 2 clients are sampled'}"
        f"); set privacy.noise_colluders below {smallest}, or a count privacy.secagg_threshold above {colluders}",
    )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_canaries(cfg: DictConfig) -> None:
    """``privacy.canaries``: the exposure audit's canaries (:mod:`fedllm_app.data.canaries`)."""
    c = (cfg.get("privacy") or {}).get("canaries")
    if c is None:
        return
    for key in ("count", "repeats", "partition", "digits", "seed", "sample"):
        _check(_int(c.get(key)), f"privacy.canaries.{key}={c.get(key)!r} must be an integer; see conf/config.yaml")
    _check(c.count >= 0, f"privacy.canaries.count={c.count} must be >= 0 (0 = no canaries); e.g. 10")
    if c.count == 0:
        return
    _check(c.repeats >= 1, f"privacy.canaries.repeats={c.repeats} must be at least 1 (copies of each canary)")
    _check(
        0 <= c.partition < cfg.num_clients,
        f"privacy.canaries.partition={c.partition} is outside 0..{cfg.num_clients - 1} (num_clients="
        f"{cfg.num_clients}); name the partition whose training rows get the canaries, e.g. "
        f"privacy.canaries.partition=0",
    )
    _check(
        1 <= c.digits <= MAX_CANARY_DIGITS,
        f"privacy.canaries.digits={c.digits} must be in 1..{MAX_CANARY_DIGITS} (10^digits possible secrets); "
        f"e.g. privacy.canaries.digits=6",
    )
    _check(
        c.count <= 10**c.digits,
        f"privacy.canaries.count={c.count} distinct secrets do not fit in 10^{c.digits} candidates; lower count or "
        f"raise privacy.canaries.digits",
    )
    _check(
        c.method in CANARY_METHODS,
        f"privacy.canaries.method={c.method!r} must be one of {', '.join(CANARY_METHODS)}; e.g. auto",
    )
    _check(c.sample >= 100, f"privacy.canaries.sample={c.sample} must be at least 100 (candidates for the estimate)")
    _check(
        task_name(cfg) == "sft",
        "privacy.canaries with task=dpo: canaries are instruction/response rows; run the audit with task=sft or set "
        "privacy.canaries.count=0",
    )
    _check(
        cfg.strategy.name != "local",
        "privacy.canaries with strategy=local: there is no global adapter whose exposure to measure; choose a "
        "federated strategy or set privacy.canaries.count=0",
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~")) or os.sep in name and Path(name).expanduser().exists() or name.count("/") > 1
    )


def parse_faults(entries: Iterable[str]) -> dict[tuple[int, int], str]:
    """``fault_injection``: ``["nan-r1-p0", "scale-every-p2"]`` -> ``{(1, 0): "nan", (EVERY_ROUND, 2): "scale"}``;
    a bad entry raises a ConfigError naming it.
    """
    out = {}
    for entry in entries:
        match = _FAULT_ENTRY.match(str(entry))
        if not match or match.group(1) not in FAULT_KINDS:
            raise ConfigError(
                f"fault_injection entry {entry!r} must be <kind>-r<round>-p<partition> (or <kind>-every-p<partition>) "
                f"with kind one of "
                f"{', '.join(FAULT_KINDS)}; e.g. fault_injection=[nan-r1-p0]"
            )
        rnd = int(match.group(2)) if match.group(2) else EVERY_ROUND
        out[(rnd, int(match.group(3)))] = match.group(1)
    return out


def task_name(cfg: DictConfig) -> str:
    """``sft`` or ``dpo`` (``sft`` for a config without a task group)."""
    return str(cfg.task.name) if "task" in cfg else "sft"


def run_name(cfg: DictConfig) -> str:
    """The run's folder name under ``output_dir``."""
    return cfg.run_name or f"{cfg.strategy.name}-{cfg.dataset.name}-seed{cfg.seed}"


def cfg_key(cfg: DictConfig) -> str:
    """A short stable hash of the whole config (cache keys)."""
    import hashlib

    blob = OmegaConf.to_yaml(cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- FlowerTune LLM leaderboard challenges
# conf/challenge/<name>.yaml: the board's fixed settings (challenge.fixed) and the baseline recipe. Changing a fixed
# setting voids a leaderboard entry but not the run, as on the board itself (its rules void the entry, its template
# runs anyway): the server warns once at start and fedllm-eval's leaderboard row says so.
CHALLENGES = ("general_nlp", "finance", "medical", "code")


def challenge_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's own values of the settings a challenge fixes (:data:`CHALLENGES`)."""
    return {
        "dataset": cfg.dataset.name,
        "num_clients": cfg.num_clients,
        "sample_clients": cfg.sample_clients,
        "partition": cfg.partition.name,
        "heldout_in_training": bool(cfg.dataset.get("heldout_in_training", False)),
    }


def challenge_deviations(cfg: DictConfig) -> list[str]:
    """``key=<run's value> (the board fixes <value>)`` for each fixed setting the run changed; [] outside a
    challenge or when the run keeps them all.
    """
    ch = cfg.get("challenge")
    if not ch:
        return []
    own = challenge_settings(cfg)
    return [f"{k}={own.get(k)!r} (the board fixes {v!r})" for k, v in ch.fixed.items() if own.get(k) != v]


def challenge_warning(cfg: DictConfig) -> str | None:
    """The one line a run with a changed fixed setting gets (None when it is eligible or not a challenge)."""
    changed = challenge_deviations(cfg)
    if not changed:
        return None
    return (
        f"challenge={cfg.challenge.name}: {', '.join(changed)}: this run cannot be a FlowerTune leaderboard "
        f"entry (it runs anyway); drop the override to keep it eligible"
    )

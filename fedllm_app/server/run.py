"""One federated run on the server, step by step: strategy, model, evaluation, checkpoints, baseline, summary,
model card (and Hub upload); the experiment trackers are closed when the run ends, failed or not.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from evaluation.exposure import audit, check_method
from evaluation.heldout import HeldoutRows, exact_match_due
from evaluation.preferences import HeldoutPreferences
from evaluation.runner import check_round_benchmarks, round_benchmarks
from fedllm_app.comm.codecs import CommParams
from fedllm_app.config import ConfigError, challenge_warning
from fedllm_app.data import pipeline
from fedllm_app.data.canaries import CanarySpec, describe
from fedllm_app.model import get_model, initial_adapter, set_adapter
from fedllm_app.server.guard import GuardParams, ReplyGuard
from fedllm_app.server.hub import check_hub, push_adapter
from fedllm_app.server.model_card import write_model_card
from fedllm_app.server.outputs import RunWriter, comparison_table
from fedllm_app.server.phases import Phases
from fedllm_app.server.resume import ResumeState, load_state, restore_rng, save_state
from fedllm_app.server.rounds import TOTAL_KEYS, run_rounds
from fedllm_app.server.secure_round import secagg_params
from strategies import registry
from strategies.accounting import epsilon, noise_for_epsilon
from strategies.dp import Accounting, with_dp
from strategies.fedadagrad import FedAdagrad
from strategies.fedopt import AdaptiveMomentOptimizer
from strategies.hetero import HeteroRankParams, with_lora_ranks
from strategies.local import LocalOnly
from strategies.privacy import DPParams, noise_share_range, noise_share_std
from strategies.records import from_record, to_record

log = logging.getLogger("fedllm")


def strategy_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return {
        "num_clients": cfg.num_clients,
        "sample_clients": cfg.sample_clients,
        "num_rounds": cfg.num_rounds,
        "lr_max": cfg.training.learning_rate,
        "lr_min": cfg.training.min_learning_rate,
        "seed": cfg.seed,
        "query_timeout": cfg.round_timeout,
    }


def build_strategy(cfg: DictConfig) -> Any:
    """Build ``cfg.strategy`` from the fixed registry by its ``_target_`` (``name`` is only a label).

    Never Hydra's ``instantiate``: the run config is written by whoever starts the run
    (:mod:`strategies.registry`). Hyperparameters are scalars validated by each strategy's
    dataclass; a bad value raises a ConfigError that names it. With ``lora_aggregation`` hetlora or
    flexlora the class is combined with :class:`strategies.hetero.HeteroRank` (a meaningless
    combination is a ConfigError too).
    """
    params = {k: v for k, v in OmegaConf.to_container(cfg.strategy, resolve=True).items() if k != "name"}
    hetero = hetero_params(cfg)
    private = dp_settings(cfg)
    try:
        if private is not None:
            return registry.build(params, wrap=with_dp, **strategy_kwargs(cfg), **private)
        if hetero is None:
            return registry.build(params, **strategy_kwargs(cfg))
        wrap = partial(with_lora_ranks, method=hetero.method)
        return registry.build(params, wrap=wrap, **strategy_kwargs(cfg), hetero=hetero)
    except ValueError as err:
        raise ConfigError(f"strategy={cfg.strategy.name}: {err}") from None


def topk_warning(strategy: Any, comm: CommParams, name: str) -> str | None:
    """A sentence for the run's log when an adaptive server optimizer meets top-k updates, else None.

    FedAdam, FedYogi and FedAdagrad scale each value's step by that value's own history: a value that top-k sends
    rarely, with its accumulated residual, gets a full-size step. Measured on the built-in benchmark (3 seeds,
    docs/communication.md), not refused: the combination is a research subject of its own.
    """
    if comm.codec != "topk" or not isinstance(strategy, (AdaptiveMomentOptimizer, FedAdagrad)):
        return None
    return (
        f"strategy={name} with comm.codec=topk: an adaptive server step scales each value by its own history, so a "
        f"value top-k sends rarely, with its accumulated residual, gets a full-size step. On the built-in benchmark "
        f"FedAdam with top-k 10% scored 0.12 exact match (0.003 with comm.downlink_delta=true) against 0.57 in "
        f"fp32 and 0.54 with comm.codec=nf4 (docs/communication.md); prefer nf4 or int8 with this strategy"
    )


def dp_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """``privacy.*`` as DP-FedAvg's arguments (``dp``, ``accounting``), or None when ``privacy.dp`` is off.

    ``privacy.noise_multiplier=null`` is derived here, before the run: the smallest z whose epsilon after
    ``num_rounds`` rounds at q = sample_clients / num_clients is at most ``privacy.target_epsilon``.
    """
    p = cfg.get("privacy") or {}
    if not p.get("dp", False):
        return None
    rate = cfg.sample_clients / cfg.num_clients
    accounting = Accounting(float(p.delta), str(p.accountant), p.target_epsilon)
    z = p.noise_multiplier
    if z is not None and p.target_epsilon is not None:
        first = epsilon(rate, float(z), 1, accounting.delta, accounting.accountant)
        if first > p.target_epsilon:
            raise ConfigError(
                f"privacy.target_epsilon={p.target_epsilon} is already exceeded by round 1 (epsilon {first:.3f} at "
                f"q={rate:g}, z={z}); raise privacy.noise_multiplier or target_epsilon, or set noise_multiplier=null "
                f"to derive it"
            )
    if z is None:
        z = noise_for_epsilon(float(p.target_epsilon), rate, cfg.num_rounds, accounting.delta, accounting.accountant)
        log.info(
            f"privacy.noise_multiplier derived: {z:.4f} keeps epsilon <= {p.target_epsilon} after {cfg.num_rounds} "
            f"rounds at q={rate:g}, delta={accounting.delta:g} ({accounting.accountant})"
        )
    dp = DPParams(
        clip_norm=float(p.clip_norm),
        noise_multiplier=float(z),
        sample_rate=rate,
        num_clients=cfg.num_clients,
        adaptive_clip=bool(p.adaptive_clip),
        target_quantile=float(p.target_quantile),
        clip_lr=float(p.clip_lr),
        noise=str(p.get("noise", "server")),
        noise_colluders=int(p.get("noise_colluders", 0)),
    )
    if dp.distributed:
        check_noise_range(cfg, dp)
    return {"dp": dp, "accounting": accounting}


def check_noise_range(cfg: DictConfig, dp: DPParams) -> None:
    """Refuse (ConfigError) a ``privacy.secagg_clip_range`` that would clip the clients' noise shares off: it
    must reach ``C + 8 s`` for the largest share std ``s``, that of the smallest threshold a round may use.
    """
    params = secagg_params(cfg)
    assert params is not None  # config refuses distributed noise without secure aggregation
    smallest = params.threshold if isinstance(params.threshold, int) else 2
    share = noise_share_std(dp.noise_multiplier, dp.clip_norm, smallest, dp.noise_colluders)
    need = noise_share_range(dp.clip_norm, share)
    if params.clip_range < need:
        raise ConfigError(
            f"privacy.secagg_clip_range={params.clip_range:g} would clip the clients' noise shares off (std up to "
            f"{share:.4g} = z C / sqrt(t - c) at t={smallest}; a clipped coordinate plus 8 std reaches {need:.4g}); "
            f"set privacy.secagg_clip_range={math.ceil(need * 100) / 100:g} or more"
        )


def hetero_params(cfg: DictConfig) -> HeteroRankParams | None:
    """How clients of different LoRA ranks are combined, or None for a homogeneous run."""
    method = cfg.get("lora_aggregation", "homogeneous")
    if method == "homogeneous":
        return None
    return HeteroRankParams(
        method=method,
        r_max=cfg.model.lora.r,
        weighting=cfg.get("hetlora_weighting", "norm"),
        average=cfg.get("hetlora_average", "zero_padded"),
        flexlora_average=cfg.get("flexlora_average", "products"),
        query_timeout=cfg.round_timeout,  # a node that does not say its rank in time sits the round out
        prune=bool((cfg.get("hetlora_prune") or {}).get("enabled", False)),
        tail=cfg.get("hetlora_tail", "none"),
    )


def local_strategy(cfg: DictConfig) -> LocalOnly:
    """The local-only baseline's strategy (clients of different ranks keep their own ranks there too)."""
    hetero = hetero_params(cfg)
    if hetero is None:
        return LocalOnly(**strategy_kwargs(cfg))
    # each client keeps its declared rank: its clients neither self-prune nor hold the global's other ranks
    hetero = replace(hetero, prune=False, tail="none")
    return with_lora_ranks(LocalOnly, hetero.method)(**strategy_kwargs(cfg), hetero=hetero)


@contextmanager
def eval_threads(cfg: DictConfig) -> Iterator[None]:
    """Torch threads for the server's evaluation: ``eval.num_threads``, 0 = every CPU this process may use.

    The clients wait while the server evaluates (a round's evaluation ends before the next round is sent),
    so in a simulation on one machine the evaluation can have every core, not only a client's share
    (``training.num_threads``, which the ServerApp keeps for everything else).
    """
    wanted = int(cfg.eval.get("num_threads", 0) or 0)
    if wanted < 0:
        raise ConfigError(f"eval.num_threads={wanted} must be >= 0 (0 = every CPU the process may use); e.g. 2")
    before = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux; macOS
    torch.set_num_threads(wanted or usable or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FederatedRun:
    """One run's state on the server: config, model, held-out data, outputs.

    Use it as a context manager: leaving the ``with`` block ends the experiment trackers' runs, marked failed
    if an exception left it.
    """

    def __init__(self, cfg: DictConfig, started: float) -> None:
        self.cfg = cfg
        self.started = started
        self.phases = Phases(started)  # start-up phases, wall and CPU, into the summary
        self.strategy = build_strategy(cfg)  # validates the hyperparameters before anything is loaded
        self.guard_params = GuardParams.from_config(cfg.get("robust"))
        self.comm = CommParams.from_config(cfg.get("comm"))
        check_round_benchmarks(cfg)
        self.exact_every = int(cfg.eval.get("exact_match_every", 1))
        exact_match_due(self.exact_every, 1, cfg.num_rounds)  # a bad value fails at start, not at round N
        check_hub(cfg)
        self.resumed = resume_point(cfg) if cfg.resume else None
        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        self.writer = RunWriter(cfg)  # opens the trackers: a missing package fails here, before the model loads
        self.phases.mark("config")
        try:
            self._load(cfg)
        except BaseException:
            self.writer.close(failed=True)
            raise

    def __enter__(self) -> FederatedRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.writer.close(failed=exc_type is not None)

    def _load(self, cfg: DictConfig) -> None:
        """Model, held-out data and the run's records."""
        log.info(f"run '{self.writer.dir.name}': outputs in {self.writer.dir}")
        log.info(f"strategy: {self.strategy.describe()}")
        if warning := challenge_warning(cfg):  # a FlowerTune challenge whose fixed settings were changed
            log.warning(warning)
        if advice := self.comm.downlink_advice:
            log.warning(advice)
        if warning := topk_warning(self.strategy, self.comm, cfg.strategy.name):
            log.warning(warning)
        self.model, self.tokenizer = get_model(cfg.model, cfg.seed)
        self.initial = to_record(initial_adapter(cfg.model, cfg.seed))  # not what the shared model holds now
        set_adapter(self.model, from_record(self.initial))
        self.phases.mark("model")
        self.test = pipeline.heldout(cfg)
        by = cfg.partition.by
        log.info(f"data: {cfg.dataset.name} ({cfg.task.name}), partition {cfg.partition.name}")
        plan = {}
        for pid, rows in enumerate(pipeline.all_partitions(cfg)):
            plan[pid] = len(rows)
            log.info(f"client {pid}: {len(rows)} rows, {by} mix {pipeline.domain_mix(rows, by)}")
        # One judge of weights, update sizes and node -> partition for the whole run, baseline included.
        self.guard = ReplyGuard(self.guard_params, plan)
        log.info(f"server held-out: {len(self.test)} rows")
        if (spec := CanarySpec.from_config(cfg)).count:
            try:
                method = check_method(self.tokenizer, cfg)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            log.info(f"{describe(spec)}; the server measures their exposure ({method}) after the last round")
        # DPO is evaluated on held-out pairs (loss, reward margin, preference accuracy) against the reference.
        with eval_threads(cfg):
            self.preferences = (
                HeldoutPreferences(self.model, self.tokenizer, self.test, cfg) if cfg.task.name == "dpo" else None
            )
        self.heldout = HeldoutRows(self.tokenizer, self.test, cfg.training) if self.preferences is None else None
        self.summary: dict[str, Any] = {"run": self.writer.dir.name, "strategy": cfg.strategy.name}
        self.final: dict[str, float] = {}
        self.local: dict[int, dict[str, float]] = {}
        self.totals = dict.fromkeys(TOTAL_KEYS, 0)
        self.phases.mark("data")

    def evaluate(self, arrays: ArrayRecord, exact: bool = True) -> dict[str, float]:
        set_adapter(self.model, from_record(arrays))
        with eval_threads(self.cfg):
            if self.preferences is not None:
                return self.preferences.evaluate(self.model)
            return self.heldout.evaluate(self.model, exact=exact)

    def evaluate_round(self, arrays: ArrayRecord) -> dict[str, float]:
        """Held-out loss every round; exact match every ``eval.exact_match_every`` rounds and at the last; the
        ``eval.benches`` every ``eval.every`` rounds (called once per round).
        """
        rnd = len(self.writer.rounds) + 1
        metrics = self.evaluate(arrays, exact=exact_match_due(self.exact_every, rnd, self.cfg.num_rounds))
        with eval_threads(self.cfg):
            metrics.update(round_benchmarks(self.cfg, self.model, self.tokenizer, rnd, self.writer.dir))
        return metrics

    def checkpoint(self, rnd: int, arrays: ArrayRecord) -> None:
        if rnd % self.cfg.save_every == 0 or rnd == self.cfg.num_rounds:
            set_adapter(self.model, from_record(arrays))
            self.writer.save_adapter(self.model, rnd)

    def _rounds(
        self, grid: Grid, strategy: Any, arrays: ArrayRecord | None = None, **kwargs: Any
    ) -> tuple[ArrayRecord, dict[str, float]]:
        return run_rounds(
            grid,
            strategy,
            self.initial if arrays is None else arrays,
            self.cfg.num_rounds,
            self.cfg.round_timeout,
            self.writer,
            poll_interval=self.cfg.poll_interval,
            min_replies=self.cfg.min_replies,
            node_wait=self.cfg.node_wait_timeout,
            guard=self.guard,
            **{"comm": replace(self.comm, budget_mb=None), **kwargs},  # the budget is the federated run's
        )

    def save_state(self, rnd: int, arrays: ArrayRecord, record: dict[str, Any]) -> None:
        """After each federated round: everything :mod:`fedllm_app.server.resume` needs to continue from here."""
        save_state(
            self.writer.dir,
            phase=self.cfg.strategy.name,
            server_round=rnd,
            arrays=arrays,
            strategy_state=self.strategy.state_dict(),
            totals=self.totals,
            summary=self.summary,
            last_eval={k: record[k] for k in record if k == "eval_loss" or k.startswith("accuracy")},
            metrics=self.writer.rounds,
            guard_state=self.guard.state_dict(),
        )

    def _resume_rounds(self, state: ResumeState) -> dict[str, Any]:
        """Restore the saved state; return the arguments that continue the round loop after it."""
        self.strategy.load_state_dict(state.strategy)
        self.guard.load_state_dict(state.guard)
        self.totals.update(state.totals)
        self.summary = {**state.summary, "resumed_from_round": state.round}
        self.writer.restore_rounds(state.metrics)
        restore_rng(state.rng)
        log.info(f"resuming {self.writer.dir} after round {state.round}")
        return {"start_round": state.round + 1}

    def federated(self, grid: Grid) -> None:
        """The configured strategy's rounds; for ``strategy=local`` the final metrics are the clients' mean."""
        if isinstance(self.strategy, LocalOnly):
            self.summary["initial"] = self.evaluate(self.initial)
            self.summary["startup_seconds"] = time.perf_counter() - self.started
            self.phases.mark("initial_eval")
            self.summary["startup_phases"] = self.phases.summary()
            self.final = self._local_rounds(grid, self.strategy, self.cfg.strategy.name, "metrics.jsonl")
            self.summary["final"] = self.final
            return
        arrays, resume = self.initial, {}
        if self.resumed is not None:
            arrays, resume = self.resumed.arrays, self._resume_rounds(self.resumed)
        else:
            self.summary["initial"] = self.evaluate(self.initial)
            self.summary["startup_seconds"] = time.perf_counter() - self.started
            self.phases.mark("initial_eval")
            self.summary["startup_phases"] = self.phases.summary()
        arrays_out, final = self._rounds(
            grid,
            self.strategy,
            arrays,
            phase=self.cfg.strategy.name,
            evaluate=self.evaluate_round,
            after_round=self.checkpoint,
            totals=self.totals,
            on_round_end=self.save_state,
            secagg=secagg_params(self.cfg),
            comm=self.comm,
            on_budget_stop=self.budget_stop,
            **resume,
        )
        self.final = final or (self.resumed.last_eval if self.resumed else {})
        self.summary["final"] = self.final
        self._checkpoint_early_stop(arrays_out)
        self.canary_audit(arrays_out)

    def canary_audit(self, arrays: ArrayRecord) -> None:
        """With ``privacy.canaries``: the canaries' exposure in the final global adapter ``arrays``, and for
        reference in the initial one, into the summary (``canary_exposure``; :mod:`evaluation.exposure`).
        """
        if not CanarySpec.from_config(self.cfg).count:
            return
        start = time.perf_counter()
        set_adapter(self.model, from_record(self.initial))
        initial = audit(self.model, self.tokenizer, self.cfg)
        set_adapter(self.model, from_record(arrays))
        report = audit(self.model, self.tokenizer, self.cfg)
        report["initial"] = {k: initial[k] for k in ("mean", "max")}
        report["seconds"] = time.perf_counter() - start
        self.summary["canary_exposure"] = report
        log.info(
            f"canary exposure (bits, of at most log2|R| = {report['log2_space']:.2f}): mean {report['mean']:.2f}, "
            f"max {report['max']:.2f} in the final adapter; mean {initial['mean']:.2f} in the initial one "
            f"({report['canaries'][0]['method']}, {report['seconds']:.0f} s)"
        )

    def last_round(self) -> int:
        """The last federated round completed (below num_rounds when privacy.target_epsilon stopped the run)."""
        return int(self.writer.rounds[-1]["round"]) if self.writer.rounds else 0

    def _checkpoint_early_stop(self, arrays: ArrayRecord) -> None:
        """A run stopped before num_rounds (privacy.target_epsilon) saves its last global adapter, as the end does."""
        last = self.last_round()
        if 0 < last < self.cfg.num_rounds and "stopped_after_round" not in self.summary:  # not saved by budget_stop
            set_adapter(self.model, from_record(arrays))
            self.writer.save_adapter(self.model, last)
            self.summary["stopped_after_round"] = last
            self.summary["stopped_because"] = "privacy.target_epsilon"

    def budget_stop(self, rnd: int, arrays: ArrayRecord) -> None:
        """The communication budget ended the run after round ``rnd``: save that round's adapter, say so."""
        set_adapter(self.model, from_record(arrays))
        self.writer.save_adapter(self.model, rnd)
        self.summary["stopped_by_budget_after_round"] = rnd
        self.summary["stopped_after_round"] = rnd
        self.summary["stopped_because"] = "comm.budget_mb"

    def local_baseline(self, grid: Grid) -> None:
        """Each client trains alone for the same rounds and steps (skipped when that is the main run)."""
        if not isinstance(self.strategy, LocalOnly):
            self._local_rounds(grid, local_strategy(self.cfg), "local", "baseline_local/metrics.jsonl")

    def _local_rounds(self, grid: Grid, strategy: LocalOnly, phase: str, metrics_path: str) -> dict[str, float]:
        """Run local-only rounds, evaluate every client's adapter; return (and record) their mean."""
        (self.writer.dir / metrics_path).unlink(missing_ok=True)  # a resumed run repeats the baseline
        self._rounds(grid, strategy, phase=phase, metrics_path=metrics_path)
        self.local = {pid: self.evaluate(arrays) for pid, arrays in sorted(strategy.client_arrays.items())}
        keys = sorted({k for m in self.local.values() for k in m})
        mean = {k: sum(m.get(k, 0.0) for m in self.local.values()) / len(self.local) for k in keys}
        self.summary["baseline_local"] = {"mean": mean, "clients": {str(k): v for k, v in self.local.items()}}
        return mean

    def finish(self) -> None:
        """Summary, plot and comparison table; then the model card (and upload) of the final global adapter.

        Raises :class:`NoRoundAggregated`, after writing the summary, when rounds ran but none of them changed
        the global adapter: the run produced nothing, and it says so instead of ending as completed.
        """
        self.summary.update(self.totals)
        self.summary.update(aggregation_counts(self.writer.rounds, self.cfg.strategy.name))
        mean_acc = self.summary.get("baseline_local", {}).get("mean", {}).get("accuracy")
        self.summary["total_seconds"] = time.perf_counter() - self.started
        self.writer.write_summary(self.summary)
        self.writer.plot(mean_acc)
        if self.writer.rounds and self.summary.get("rounds_aggregated") == 0:
            raise NoRoundAggregated(
                f"none of the {len(self.writer.rounds)} rounds was aggregated: each had fewer than "
                f"min_replies={self.cfg.min_replies} valid replies, so the global adapter is still the initial "
                f"one and nothing is published; the failed and rejected nodes of each round are in "
                f"{self.writer.dir / 'metrics.jsonl'} (look at those nodes' logs, e.g. `flwr log`)"
            )
        if self.local:
            metric = "held-out preference accuracy" if self.preferences is not None else "held-out exact match"
            table = comparison_table(self.final, self.local, self.cfg.strategy.name, metric)
            (self.writer.dir / "comparison.md").write_text(table + "\n")
            log.info("\n" + table + "\n")
        self.publish()
        log.info("final: " + ", ".join(f"{k} {v:.3f}" for k, v in self.final.items() if isinstance(v, int | float)))
        log.info(f"done in {self.summary['total_seconds']:.0f} s; outputs in {self.writer.dir}")

    def publish(self) -> None:
        """The model card beside the final global adapter, then its upload if ``hub.push`` (strategy=local has no
        global adapter).
        """
        last = self.summary.get("stopped_after_round", self.cfg.num_rounds)
        folder = self.writer.dir / "checkpoints" / f"round-{last}"
        if not folder.is_dir():
            return
        card = write_model_card(folder, self.cfg, self.summary)
        log.info(f"model card: {card}")
        if self.cfg.hub.push:
            push_adapter(folder, self.cfg.hub)


class NoRoundAggregated(RuntimeError):
    """Every federated round ran without enough valid replies: the run has no trained global adapter."""


def aggregation_counts(rounds: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
    """``rounds_aggregated`` and ``rounds_not_aggregated`` (their numbers) of the federated rounds in ``rounds``
    (metrics.jsonl's records); empty for ``strategy=local``, which aggregates nothing.
    """
    if strategy == "local":
        return {}
    skipped = [int(r["round"]) for r in rounds if not r.get("aggregated", True)]
    return {"rounds_aggregated": len(rounds) - len(skipped), "rounds_not_aggregated": skipped}


# Keys that may differ between an interrupted run and its resumption. Not num_rounds: the cosine lr
# schedule spans num_rounds, so another value would change the lr of every round still to run.
RESUMABLE_CHANGES = (
    "round_timeout",
    "node_wait_timeout",
    "min_replies",
    "poll_interval",
    "resume",
    "logging",
    "hub",
)


def check_same_schedule(cfg: DictConfig, saved: dict[str, Any]) -> None:
    """Refuse a resume whose ``num_rounds`` differs from the run's: the lr schedule would shift silently."""
    before = saved.get("num_rounds")
    if before is not None and before != cfg.num_rounds:
        raise ConfigError(
            f"resume={cfg.resume}: the run was made with num_rounds={before} and its cosine learning-rate schedule "
            f"spans those rounds; num_rounds={cfg.num_rounds} would change the lr of every round still to run. "
            f"Resume with num_rounds={before}, or start a new run from the last checkpoint "
            f"(model.adapter=<run dir>/checkpoints/round-<N>) with the rounds you want"
        )


def resume_point(cfg: DictConfig) -> ResumeState:
    """The saved state of ``cfg.resume``, after checking that the run's config matches the saved one."""
    run_dir = Path(cfg.resume).expanduser()
    if cfg.strategy.name == "local":
        raise ConfigError("resume is not supported for strategy=local: each client's adapter lives on its node")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: no config.yaml there; give the folder of an earlier run")
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    check_same_schedule(cfg, saved)
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"resume={cfg.resume}: the run was made with other values of {', '.join(differ)}; "
            f"resume with the same overrides as the interrupted run (only {', '.join(RESUMABLE_CHANGES)} may change)"
        )
    try:
        state = load_state(run_dir)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if state.round > cfg.num_rounds:
        raise ConfigError(f"resume={cfg.resume}: the run already completed {state.round} > num_rounds={cfg.num_rounds}")
    return state

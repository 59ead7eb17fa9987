"""Sweeps: a Hydra multirun in which every job is one real ``flwr run`` simulation.

    python -m fedllm_app.ops.sweep -m strategy=fedavg,fedprox,scaffold,fedavgm,fedadagrad,fedyogi,fedadam,local,central

Each job runs the app through Flower (its own FLWR_HOME and ports, ``num_clients``
SuperNodes with one CPU each) into ``<sweep dir>/runs/<job>/``; after every job the
sweep folder's ``comparison.md``, ``comparison.csv`` and ``comparison.png`` are
rewritten from all finished runs, so the last job leaves the full comparison. When the
sweep varies ``seed``, ``comparison_seeds.md`` (and ``.csv``) also gives each setting's
mean and sample standard deviation over its seeds.

    python -m fedllm_app.ops.sweep -m num_rounds=30 seed=0,1,2 strategy=fedavg,local
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shlex
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedllm_app.config import conf_dir
from fedllm_app.console import setup_console
from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

log = logging.getLogger("fedllm")


def job_name(overrides: list[str]) -> str:
    """A folder name from the job's overrides: ``strategy=fedprox strategy.mu=0.1`` -> ``fedprox_mu-0.1``."""
    parts = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key not in ("output_dir", "run_name"):
            parts.append(value if "." not in key else f"{key.rsplit('.', 1)[1]}-{value}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts)) or "default"


def run_job(overrides: list[str], num_clients: int, sweep_dir: Path) -> str:
    """Run one job through Flower; return its final status."""
    name = job_name(overrides)
    home = sweep_dir / ".flwr-home" / name
    home.mkdir(parents=True, exist_ok=True)
    runner = FlowerRunner(home)
    # The local-only baseline is a sweep entry of its own (strategy=local), not repeated in every job.
    flower_overrides = " ".join(
        ["baseline=none", *map(shlex.quote, overrides), f"output_dir={sweep_dir / 'runs'}", f"run_name={name}"]
    )
    try:
        status, output = runner.run(flower_overrides, num_supernodes=num_clients, timeout=3600)
    finally:
        kill_flower_processes(str(home))
    (sweep_dir / "runs" / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "runs" / f"{name}.log").write_text(output)
    (sweep_dir / "runs" / f"{name}.overrides.json").write_text(json.dumps(overrides))
    log.info("sweep job %s: %s", name, status)
    return status


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Final metrics and per-round accuracy of every finished run under ``sweep_dir/runs``."""
    runs = []
    for summary_path in sorted((sweep_dir / "runs").glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        rounds = [json.loads(x) for x in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
        runs.append({"name": summary_path.parent.name, "summary": summary, "rounds": rounds})
    return runs


def write_comparison(sweep_dir: Path) -> None:
    """``comparison.csv``, ``comparison.md`` and ``comparison.png`` from every finished run under ``sweep_dir``.

    The "vs local-only mean" column is there only when a ``strategy=local`` run is among them; a metric a
    run does not have reads ``n/a``.
    """
    runs = collect(sweep_dir)
    if not runs:
        return
    write_table(sweep_dir / "comparison", *comparison_rows(runs))
    _plot(runs, sweep_dir / "comparison.png")
    write_seed_comparison(sweep_dir, runs)


def write_table(stem: Path, header: list[str], rows: list[list[Any]]) -> None:
    """``<stem>.csv`` (numbers as they are) and ``<stem>.md`` (numbers formatted per column)."""
    with stem.with_suffix(".csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(h, c) for h, c in zip(header, row, strict=True)) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def job_overrides(sweep_dir: Path) -> dict[str, list[str]]:
    """Each run's job overrides by run name: what ``run_job`` saved, else Hydra's ``<job>/.hydra/overrides.yaml``."""
    import yaml

    found = {}
    for path in sweep_dir.glob("*/.hydra/overrides.yaml"):
        overrides = [str(o) for o in yaml.safe_load(path.read_text()) or []]
        found[job_name(overrides)] = overrides
    for path in (sweep_dir / "runs").glob("*.overrides.json"):
        found[path.name.removesuffix(".overrides.json")] = json.loads(path.read_text())
    return found


def seed_groups(runs: list[dict[str, Any]], overrides: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by their setting: the job name of their overrides without ``seed=``, in sweep order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        own = overrides.get(r["name"])
        key = r["name"] if own is None else job_name([o for o in own if not o.startswith("seed=")])
        groups[key].append(r)
    return dict(groups)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _megabytes(summary: dict[str, Any]) -> float:
    return (summary.get("bytes_sent_total", math.nan) + summary.get("bytes_received_total", math.nan)) / 1e6


def seed_rows(groups: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[Any]]]:
    """Per setting: seeds, accuracy mean/sd and per seed, eval loss mean, MB both ways, seconds (means).

    "vs local-only" is the setting's mean accuracy minus the mean over every ``strategy=local`` run, when
    there is one.
    """
    local = [
        r["summary"]["final"].get("accuracy", math.nan)
        for g in groups.values()
        for r in g
        if r["summary"]["strategy"] == "local"
    ]
    local_mean = _mean_sd(local)[0] if local else None
    header = [
        "setting",
        "strategy",
        "seeds",
        "accuracy mean",
        "accuracy sd",
        "accuracy per seed",
        "eval_loss mean",
        *(["vs local-only mean"] if local_mean is not None else []),
        "MB both ways",
        "seconds",
    ]
    rows = []
    for key, group in groups.items():
        finals = [r["summary"]["final"] for r in group]
        mean, sd = _mean_sd([f.get("accuracy", math.nan) for f in finals])
        per_seed = " ".join(f"{f.get('accuracy', math.nan):.3f}" for f in finals)
        gap = [mean - local_mean] if local_mean is not None else []
        rows.append(
            [
                key,
                group[0]["summary"]["strategy"],
                len(group),
                mean,
                sd,
                per_seed,
                _mean_sd([f.get("eval_loss", math.nan) for f in finals])[0],
                *gap,
                _mean_sd([_megabytes(r["summary"]) for r in group])[0],
                _mean_sd([r["summary"].get("total_seconds", math.nan) for r in group])[0],
            ]
        )
    return header, rows


def write_seed_comparison(sweep_dir: Path, runs: list[dict[str, Any]]) -> None:
    """``comparison_seeds.md``/``.csv`` when some setting ran with more than one seed."""
    groups = seed_groups(runs, job_overrides(sweep_dir))
    if all(len(g) < 2 for g in groups.values()):
        return
    write_table(sweep_dir / "comparison_seeds", *seed_rows(groups))


def comparison_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The comparison's header and one row per run (numbers as they are; NaN where a run lacks a metric)."""
    keys = sorted({k for r in runs for k in r["summary"]["final"] if k.startswith("accuracy")})
    local = next((r["summary"]["final"] for r in runs if r["summary"]["strategy"] == "local"), None)
    header = ["run", "strategy", *keys, "eval_loss", *(["vs local-only mean"] if local else []), "seconds"]
    rows = []
    for r in runs:
        final = r["summary"]["final"]
        gap = [final.get("accuracy", math.nan) - local.get("accuracy", math.nan)] if local else []
        cells = [final.get(k, math.nan) for k in keys]
        seconds = r["summary"].get("total_seconds", math.nan)
        rows.append([r["name"], r["summary"]["strategy"], *cells, final.get("eval_loss", math.nan), *gap, seconds])
    return header, rows


def _cell(header: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or math.isnan(value):
        return "n/a"
    if header == "seconds":
        return f"{value:.0f}"
    if header in ("seeds", "MB both ways"):
        return f"{value:.2f}" if header == "MB both ways" else str(value)
    return f"{value:+.3f}" if header == "vs local-only mean" else f"{value:.3f}"


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(runs)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_figure(runs: list[dict[str, Any]]) -> Any:
    """Held-out accuracy per (whole) round of every run; a local-only run is its final mean, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        acc = [(x["round"], x["accuracy"]) for x in r["rounds"] if "accuracy" in x]
        if acc:
            ax.plot(*zip(*acc, strict=True), marker=".", label=r["name"])
        else:  # local-only: one final mean over its clients
            ax.axhline(r["summary"]["final"].get("accuracy", math.nan), linestyle="--", color="gray", label=r["name"])
    ax.set(xlabel="round", ylabel="held-out exact match", ylim=(0, 1), title="Held-out accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    """Entry point of ``fedllm-sweep``: one Flower run per job, then the comparison."""
    setup_console()
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir if hc.mode.name == "MULTIRUN" else hc.run.dir).resolve()
    status = run_job(list(hc.overrides.task), cfg.num_clients, sweep_dir)
    write_comparison(sweep_dir)
    log.info("sweep comparison: %s", sweep_dir / "comparison.md")
    if status != "finished:completed":
        raise RuntimeError(f"run {job_name(list(hc.overrides.task))} ended {status}; see {sweep_dir / 'runs'}")


if __name__ == "__main__":
    main()

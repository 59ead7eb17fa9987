"""Run outputs: metrics.jsonl (mirrored to the experiment trackers), summary.json, PEFT checkpoints, a plot and the
final table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import run_name
from fedllm_app.server.trackers import open_trackers

PRIVATE_DIR = 0o700
# The ServerApp and ClientApp write with this umask: files 0600, folders 0700 (outputs, checkpoints, caches).
PRIVATE_UMASK = 0o077


class RunWriter:
    """Writes everything a run produces under ``<output_dir>/<run_name>/``.

    Every metrics row also goes to the trackers of ``logging.report_to`` (:mod:`fedllm_app.server.trackers`),
    opened here, before the model is loaded, so a missing package or an unwritable folder fails first;
    :meth:`close` ends their runs.
    """

    def __init__(self, cfg: DictConfig) -> None:
        if cfg.get("resume"):
            self.dir = Path(cfg.resume).expanduser().resolve()
        else:
            self.dir = (Path(cfg.output_dir).expanduser() / run_name(cfg)).resolve()
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "metrics.jsonl").write_text("")
            (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.dir.chmod(PRIVATE_DIR)  # checkpoints, resume state and metrics: the server operator's alone
        self.rounds: list[dict[str, Any]] = []
        self.trackers = open_trackers(cfg, self.dir)

    def restore_rounds(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl with the rows of the rounds completed before a resume."""
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.rounds = list(rows)

    def log_round(self, record: dict[str, Any], path: str = "metrics.jsonl") -> None:
        target = self.dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if path == "metrics.jsonl":
            self.rounds.append(record)
        self.trackers.log_row(record, path)

    def close(self, failed: bool = False) -> None:
        """End the trackers' runs (marked failed if the run raised); safe to call twice."""
        self.trackers.close(failed)

    def save_adapter(self, model: Any, server_round: int) -> Path:
        out = self.dir / "checkpoints" / f"round-{server_round}"
        model.save_pretrained(out)
        return out

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        return path

    def plot(self, local_mean_accuracy: float | None = None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = [r["round"] for r in self.rounds]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for key in ("train_loss", "eval_loss"):
            ax1.plot(rounds, [r.get(key, math.nan) for r in self.rounds], marker="o", label=key)
        ax1.set(xlabel="round", ylabel="loss", title="Loss")
        ax1.legend()
        ax2.plot(
            rounds, [r.get("accuracy", math.nan) for r in self.rounds], marker="o", label=self.rounds[0]["strategy"]
        )
        if local_mean_accuracy is not None:
            ax2.axhline(local_mean_accuracy, color="gray", linestyle="--", label="local-only mean (final)")
        ax2.set(xlabel="round", ylabel="exact match", title="Held-out accuracy", ylim=(0, 1))
        ax2.legend()
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = self.dir / "metrics.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def format_round(r: dict[str, Any]) -> str:
    """One readable line per round."""
    acc = f" acc {r['accuracy']:.3f}" if "accuracy" in r else ""
    if "reward_margin" in r:  # DPO: accuracy is the held-out preference accuracy
        acc += f" margin {r['reward_margin']:.3f}"
    ev = f" | eval_loss {r['eval_loss']:.3f}{acc}" if "eval_loss" in r else ""
    loss = r.get("train_loss")
    rejected = f", {len(r['rejected'])} rejected" if r.get("rejected") else ""
    skipped = "" if r.get("aggregated", True) else " | NOT aggregated"
    if "epsilon" in r:  # DP-FedAvg: the privacy spent so far
        skipped += f" | epsilon {r['epsilon']:.2f} (delta {r['delta']:g})"
    budget = f" | comm {r['comm_mb_used']:.2f}/{r['comm_budget_mb']:g} MB" if r.get("comm_budget_mb") else ""
    return (
        f"{r['phase']} round {r['round']}/{r['num_rounds']} | clients {r['sampled']} sampled, "
        f"{r['replied']} replied, {r['failed']} failed{rejected}{skipped} | train_loss "
        f"{'n/a' if loss is None else f'{loss:.3f}'}{ev} | {r['seconds']:.1f} s | "
        f"sent {r['bytes_sent'] / 1e6:.2f} MB, received {r['bytes_received'] / 1e6:.2f} MB{budget}"
    )


def comparison_table(
    fed: dict[str, float], local: dict[int, dict[str, float]], strategy: str, metric: str = "held-out exact match"
) -> str:
    """Markdown table: per domain, the federated model vs the local-only mean and each client."""
    keys = sorted(k for k in fed if k.startswith("accuracy/")) + ["accuracy"]
    clients = sorted(local)
    head = f"| {metric} | {strategy} | local-only mean | " + " | ".join(f"local client {c}" for c in clients)
    lines = [head + " |", "|" + "---|" * (3 + len(clients))]
    for k in keys:
        name = k.split("/", 1)[1] if "/" in k else "all domains"
        mean = sum(local[c].get(k, 0.0) for c in clients) / max(len(clients), 1)
        cells = " | ".join(f"{local[c].get(k, 0.0):.3f}" for c in clients)
        lines.append(f"| {name} | {fed.get(k, 0.0):.3f} | {mean:.3f} | {cells} |")
    return "\n".join(lines)

"""What loading the ClientApp costs each round in a real deployment, per SuperNode isolation mode.

Starts a SuperLink and two SuperNodes on loopback (:class:`fedllm_app.deploy.Deployment`)
once per mode, runs the tiny default for a few rounds and reads metrics.jsonl:

- ``subprocess``: Flower's default; each message runs in a fresh ``flwr-clientapp``
  process (interpreter, imports, base model, every round).
- ``inline`` / ``fork``: ``flower-supernode --isolation process`` + ``python -m fedllm_app.warm_superexec
  --mode inline|fork``; each message runs inside, or in a fork of, a process that already holds the
  libraries and the model (inline: also the tokenised data and trainer, across rounds).
- ``<mode>:<seconds>`` (e.g. ``inline:0.5``): the same mode with the SuperNodes started as
  ``fedllm-supernode --idle-pull-interval <seconds>`` (:mod:`fedllm_app.ops.supernode`) instead of Flower's
  fixed 3 s between two empty pulls.

"Server send to first step" is, per client, the time from the server creating the round's message to the
client's first optimizer step (start-up before the call + set-up), the figure of issue 17's round-start goal.

Usage::

    python benchmarks/deploy_model_loading.py [--rounds 4] [--modes subprocess fork inline inline:0.5] [--overrides ""]
        [--debug-logs DIR]    # Flower's timestamped DEBUG logs of each hand-over, kept in DIR/<mode>/

Not a test: it prints a markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from fedllm_app.ops.deploy import Deployment


def measure(variant: str, rounds: int, overrides: str, logs: Path | None = None) -> dict[str, float]:
    mode, _, interval = variant.partition(":")
    pull = float(interval) if interval else None
    level = "DEBUG" if logs else None
    with (
        tempfile.TemporaryDirectory() as tmp,
        Deployment(Path(tmp), isolation=mode, idle_pull_interval=pull, flower_log_level=level) as dep,
    ):
        dep.start_superlink()
        for pid in range(2):
            dep.start_node(f"node{pid}", {"partition-id": pid, "num-partitions": 2})
        dep.wait_for_nodes(2)
        result = dep.run(
            f"num_rounds={rounds} num_clients=2 sample_clients=2 baseline=none {overrides} output_dir=out run_name=b"
        )
        assert result.status == "finished:completed", result.output[-3000:]
        rows = [json.loads(x) for x in (dep.root / "out" / "b" / "metrics.jsonl").read_text().splitlines()]
        if logs:  # the processes' timestamped DEBUG logs and the round lines, per variant
            shutil.copytree(dep.root / "logs", logs / variant.replace(":", "-"), dirs_exist_ok=True)
            shutil.copy(dep.root / "out" / "b" / "metrics.jsonl", logs / variant.replace(":", "-"))
    later = rows[1:] or rows

    def mean(key: str, per_client: bool = False) -> float:
        return statistics.mean(r[key] / (r["replied"] if per_client else 1) for r in later)

    return {
        "round 1 training phase (s)": rows[0]["train_phase_seconds"],
        "later rounds: training phase (s)": mean("train_phase_seconds"),
        "per client: start-up before the call (s)": mean("client_startup_seconds", True),
        "per client: base model load (s)": mean("client_model_load_seconds", True),
        "per client: set-up before the first step (s)": mean("client_setup_seconds", True),
        "per client: optimizer steps (s)": mean("client_optimizer_seconds", True),
        "loading (set-up before the first step) / training phase": mean("client_setup_seconds", True)
        / mean("train_phase_seconds"),
        "per client: server send to first step (s)": mean("client_startup_seconds", True)
        + mean("client_setup_seconds", True),
        "server send to first step / training phase": (
            mean("client_startup_seconds", True) + mean("client_setup_seconds", True)
        )
        / mean("train_phase_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["subprocess", "fork", "inline"])
    parser.add_argument("--overrides", default="")
    parser.add_argument(
        "--debug-logs", type=Path, help="run Flower's processes at FLWR_LOG_LEVEL=DEBUG and keep their logs here"
    )
    args = parser.parse_args()
    results = {mode: measure(mode, args.rounds, args.overrides, args.debug_logs) for mode in args.modes}
    print("| figure | " + " | ".join(args.modes) + " |")
    print("|---|" + "---|" * len(args.modes))
    for key in next(iter(results.values())):
        cells = " | ".join(f"{results[m][key]:.0%}" if "/" in key else f"{results[m][key]:.2f}" for m in args.modes)
        print(f"| {key} | {cells} |")


if __name__ == "__main__":
    main()

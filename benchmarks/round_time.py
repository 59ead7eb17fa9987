"""Per-round wall time vs the clients' optimizer-step time, start-up time, peak RSS.

Runs the demo configuration through ``flwr run`` (own FLWR_HOME, free ports) and
reads the run's metrics.jsonl. Usage::

    python benchmarks/round_time.py [--overrides "num_rounds=5 baseline=none"]

Not a test: it prints a markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overrides", default="num_rounds=5 baseline=none")
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--cpus-per-client", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        runner = FlowerRunner(home)
        out = Path(tmp) / "out"
        launched = time.time()
        try:
            status, log = runner.run(
                f"{args.overrides} output_dir={out} run_name=bench",
                num_supernodes=args.supernodes,
                federation_extra=f"client-resources-num-cpus={args.cpus_per_client}",
            )
        finally:
            kill_flower_processes(str(home))
        assert status == "finished:completed", log[-2000:]
        rounds = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "bench" / "summary.json").read_text())
    later = rounds[1:] or rounds  # round 1 includes each worker's one-off model load
    train = [r["train_phase_seconds"] for r in later]
    opt = [r["client_optimizer_seconds"] for r in later]
    ratio = statistics.mean(t / o for t, o in zip(train, opt, strict=False))
    print("| figure | value |\n|---|---|")
    print(f"| start-up: `flwr run` launch to round 1 start | {rounds[0]['started_at'] - launched:.1f} s |")
    print(
        f"| of which: ServerApp start to round 1 (config, model, initial eval) | {summary['startup_seconds']:.1f} s |"
    )
    print(f"| round 1 training phase (includes model load in each worker) | {rounds[0]['train_phase_seconds']:.2f} s |")
    print(f"| later rounds: training phase (mean) | {statistics.mean(train):.2f} s |")
    client_train = statistics.mean(r["client_train_seconds"] for r in later)
    print(f"| later rounds: clients' whole train calls (sum, mean) | {client_train:.2f} s |")
    print(f"| later rounds: clients' optimizer steps (sum, mean) | {statistics.mean(opt):.2f} s |")
    print(f"| ratio training phase / optimizer steps | {ratio:.2f} |")
    evals = statistics.mean(r.get("eval_seconds", 0) for r in later)
    print(f"| server-side evaluation per round (mean) | {evals:.2f} s |")
    print(f"| peak RSS of a client worker | {max(r['client_peak_rss_mb'] for r in rounds):.0f} MB |")


if __name__ == "__main__":
    main()

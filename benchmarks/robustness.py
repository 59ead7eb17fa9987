"""What each robust aggregator costs without attackers and keeps with them, on the built-in benchmark.

For every setting (clients, attackers), attack (none, ``scale``: the update x10, ``signflip``: the update
x-1; see ``fedllm_app/client/faults.py``) and ``strategy.aggregator``, one ``flwr run`` simulation of
FedAvg (own FLWR_HOME, free ports); the attackers are partitions ``0..f-1`` in every round, and
``strategy.num_malicious=f``. The server's norm bound is switched off (``robust.norm_factor=null``) so
that the table measures the aggregators alone. Usage::

    python benchmarks/robustness.py --settings 4:1 10:2 --rounds 10 > robustness.md
    python benchmarks/robustness.py --dry-run   # the runs it would make

Not a test: it prints a markdown table (final held-out exact match) to paste into docs/robustness.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes
from strategies.robust import AGGREGATORS

ATTACKS = ("none", "scale", "signflip")


def overrides(clients: int, attackers: int, attack: str, aggregator: str, rounds: int) -> str:
    """The run config of one cell of the table."""
    faults = [] if attack == "none" else [f"{attack}-every-p{p}" for p in range(attackers)]
    return (
        f"num_clients={clients} num_rounds={rounds} baseline=none strategy=fedavg "
        f"strategy.aggregator={aggregator} strategy.num_malicious={attackers} robust.norm_factor=null "
        f"fault_injection=[{','.join(faults)}]"
    )


def run_one(cell: str, clients: int, work: Path, name: str) -> float | None:
    """Final held-out accuracy of one run (None if it did not complete)."""
    home = work / "homes" / name
    home.mkdir(parents=True)
    try:
        status, _ = FlowerRunner(home).run(f"{cell} output_dir={work / 'out'} run_name={name}", num_supernodes=clients)
    finally:
        kill_flower_processes(str(home))
    summary = work / "out" / name / "summary.json"
    if status != "finished:completed" or not summary.is_file():
        return None
    return json.loads(summary.read_text())["final"].get("accuracy")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="+", default=["4:1", "10:2"], help="clients:attackers")
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    settings = [tuple(map(int, s.split(":"))) for s in args.settings]
    header = ["aggregator"] + [f"{c} clients, {f} attacker(s): {a}" for c, f in settings for a in ATTACKS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for aggregator in args.aggregators:
            cells = []
            for clients, attackers in settings:
                for attack in ATTACKS:
                    cell = overrides(clients, attackers, attack, aggregator, args.rounds)
                    if args.dry_run:
                        cells.append(f"`{cell}`")
                        continue
                    acc = run_one(cell, clients, Path(tmp), f"{aggregator}-{clients}-{attackers}-{attack}")
                    cells.append("failed" if acc is None else f"{acc:.3f}")
            print(f"| {aggregator} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

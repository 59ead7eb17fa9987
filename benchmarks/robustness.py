"""What each robust aggregator costs without attackers and keeps with them, on the built-in benchmark.

For every setting (clients, attackers), attack (none, ``scale``: the update x10, ``signflip``: the update
x-1; see ``fedllm_app/client/faults.py``) and ``strategy.aggregator``, one ``flwr run`` simulation of
FedAvg (own FLWR_HOME, free ports); the attackers are partitions ``0..f-1`` in every round, and
``strategy.num_malicious=f``. The server's norm bound is switched off (``robust.norm_factor=null``) so
that the table measures the aggregators alone. Usage::

    python benchmarks/robustness.py --settings 4:1 10:2:16 --rounds 10 > robustness.md
    python benchmarks/robustness.py --dry-run   # the runs it would make

A setting is ``clients:attackers`` or ``clients:attackers:steps`` (``training.max_steps`` per client per
round; default the benchmark's 40). ``10:2:16`` gives each round of 10 clients the same 160 steps in all as
a round of 4 clients at 40.

Not a test: it prints a markdown table (final held-out exact match) to paste into docs/robustness.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from flower_cells import final_accuracy, run_cell

from strategies.robust import AGGREGATORS

ATTACKS = ("none", "scale", "signflip")


def overrides(clients: int, attackers: int, attack: str, aggregator: str, rounds: int, steps: int | None = None) -> str:
    """The run config of one cell of the table."""
    faults = [] if attack == "none" else [f"{attack}-every-p{p}" for p in range(attackers)]
    cell = (
        f"num_clients={clients} num_rounds={rounds} baseline=none strategy=fedavg "
        f"strategy.aggregator={aggregator} strategy.num_malicious={attackers} robust.norm_factor=null "
        f"fault_injection=[{','.join(faults)}]"
    )
    return cell if steps is None else f"{cell} training.max_steps={steps}"


def parse_setting(text: str) -> tuple[int, int, int | None]:
    """``clients:attackers[:steps]`` as integers (steps None: the benchmark's own)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(part.isdigit() for part in parts):
        raise SystemExit(f"--settings {text!r}: write clients:attackers or clients:attackers:steps, e.g. 10:2:16")
    clients, attackers = int(parts[0]), int(parts[1])
    return clients, attackers, int(parts[2]) if len(parts) == 3 else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="+", default=["4:1", "10:2"], help="clients:attackers")
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    header = ["aggregator"] + [
        f"{c} clients, {f} attacker(s){'' if n is None else f', {n} steps'}: {a}"
        for c, f, n in settings
        for a in ATTACKS
    ]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for aggregator in args.aggregators:
            cells = []
            for clients, attackers, steps in settings:
                for attack in ATTACKS:
                    cell = overrides(clients, attackers, attack, aggregator, args.rounds, steps)
                    if args.dry_run:
                        cells.append(f"`{cell}`")
                        continue
                    name = f"{aggregator}-{clients}-{attackers}-{attack}"
                    acc = final_accuracy(run_cell(cell, clients, Path(tmp), name))
                    cells.append("failed" if acc is None else f"{acc:.3f}")
                    print(f"{aggregator} {clients}:{attackers} {attack}: {cells[-1]}", file=sys.stderr, flush=True)
            print(f"| {aggregator} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

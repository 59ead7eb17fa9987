"""What each robust aggregator costs without attackers and keeps with them, on the built-in benchmark.

For every setting (clients, attackers), attack (none, ``scale``: the update x10, ``signflip``: the update
x-1; see ``fedllm_app/client/faults.py``) and ``strategy.aggregator``, one ``flwr run`` simulation of
FedAvg (own FLWR_HOME, free ports); the attackers are partitions ``0..f-1`` in every round, and
``strategy.num_malicious=f``; ``trimmed_mean`` cuts ``f / n`` at each end (``strategy.trim_fraction``), so
it drops as many values per side as there are attackers. The server's norm bound is switched off
(``robust.norm_factor=null``) so that the table measures the aggregators alone. Usage::

    python benchmarks/robustness.py --settings 4:1 10:2:16 --rounds 10 --cells cells.jsonl > robustness.md
    python benchmarks/robustness.py --dry-run   # the runs it would make

A setting is ``clients:attackers`` or ``clients:attackers:steps`` (``training.max_steps`` per client per
round; default the benchmark's 40). ``10:2:16`` gives each round of 10 clients the same 160 steps in all as
a round of 4 clients at 40. ``--cells FILE`` keeps each finished cell (one JSON line) and reuses the cells
already in it, so a table can be made over several sittings; ``--table-only`` prints the table of the cells
there without running any (a missing one reads "not run"). Bulyan needs ``n >= 4f + 3`` replies; below
that every round of it takes the coordinate-wise median (logged), so such a cell is not run and the table
says so.

Not a test: it prints a markdown table (final held-out exact match) to paste into docs/robustness.md.
"""

from __future__ import annotations

import argparse
import json
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
    if aggregator == "trimmed_mean":
        cell += f" strategy.trim_fraction={attackers / clients:g}"
    return cell if steps is None else f"{cell} training.max_steps={steps}"


def parse_setting(text: str) -> tuple[int, int, int | None]:
    """``clients:attackers[:steps]`` as integers (steps None: the benchmark's own)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(part.isdigit() for part in parts):
        raise SystemExit(f"--settings {text!r}: write clients:attackers or clients:attackers:steps, e.g. 10:2:16")
    clients, attackers = int(parts[0]), int(parts[1])
    return clients, attackers, int(parts[2]) if len(parts) == 3 else None


def bulyan_falls_back(aggregator: str, clients: int, attackers: int) -> bool:
    """Whether every round of this cell would take the median instead (Bulyan needs n >= 4f + 3)."""
    return aggregator == "bulyan" and clients < 4 * attackers + 3


def load_cells(path: Path | None) -> dict[str, float | None]:
    """Finished cells by their run config (``--cells``); empty without a file."""
    if path is None or not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["cell"]: row["accuracy"] for row in rows}


def measure(cell: str, clients: int, name: str, work: Path, cells_file: Path | None) -> float | None:
    """The cell's final accuracy, run now and kept in ``cells_file``."""
    acc = final_accuracy(run_cell(cell, clients, work, name))
    if cells_file is not None:
        with cells_file.open("a") as out:
            out.write(json.dumps({"cell": cell, "accuracy": acc}) + "\n")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="+", default=["4:1", "10:2:16"], help="clients:attackers[:steps]")
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cells", type=Path, help="JSON lines of finished cells: reused, and appended to")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="print the table of --cells; run nothing")
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    done = load_cells(args.cells)
    header = ["aggregator"] + [
        f"{c} clients, {f} attacker(s){'' if n is None else f', {n} steps'}: {a}"
        for c, f, n in settings
        for a in ATTACKS
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for aggregator in args.aggregators:
            cells = []
            for clients, attackers, steps in settings:
                for attack in ATTACKS:
                    cell = overrides(clients, attackers, attack, aggregator, args.rounds, steps)
                    if bulyan_falls_back(aggregator, clients, attackers):
                        cells.append(f"= median (n < {4 * attackers + 3})")
                    elif args.dry_run:
                        cells.append(f"`{cell}`")
                    elif args.table_only:
                        acc = done.get(cell, "not run")
                        cells.append("failed" if acc is None else acc if isinstance(acc, str) else f"{acc:.3f}")
                    else:
                        name = f"{aggregator}-{clients}-{attackers}-{attack}"
                        acc = done[cell] if cell in done else measure(cell, clients, name, Path(tmp), args.cells)
                        cells.append("failed" if acc is None else f"{acc:.3f}")
                        print(f"{name}: {cells[-1]}", file=sys.stderr, flush=True)
            rows.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join(rows))


if __name__ == "__main__":
    main()

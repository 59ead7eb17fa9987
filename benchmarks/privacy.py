"""Accuracy vs epsilon of DP-FedAvg on the built-in benchmark (docs/privacy.md).

One ``flwr run`` simulation (own FLWR_HOME, free ports) per target epsilon, plus one without DP, all with
``num_clients`` simulated clients sampled with probability ``q``: under DP the noise multiplier is derived
from the target epsilon, the rounds and q before the run (``privacy.noise_multiplier=null``), so each run
spends its whole budget. Usage::

    python benchmarks/privacy.py --clients 100 --q 0.1 --rounds 50 --epsilons 1 4 8 > privacy.md
    python benchmarks/privacy.py --dry-run   # the runs it would make

Not a test: it prints a markdown table (final held-out exact match and the epsilon actually spent) to paste
into docs/privacy.md. 100 simulated SuperNodes need a machine with the cores and memory for them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flower_cells import final_accuracy, run_cell


def overrides(clients: int, q: float, rounds: int, target: float | None, extra: str) -> str:
    """The run config of one row; ``target`` None: no DP."""
    sample = max(1, round(q * clients))
    base = f"num_clients={clients} sample_clients={sample} num_rounds={rounds} baseline=none {extra}"
    if target is None:
        return base
    return f"{base} privacy.dp=true privacy.noise_multiplier=null privacy.target_epsilon={target}"


def accuracy_and_epsilon(run: Path | None) -> tuple[float | None, float | None]:
    """(final held-out accuracy, last epsilon) of one run; (None, None) if it did not complete."""
    if run is None:
        return None, None
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return final_accuracy(run), rows[-1].get("epsilon") if rows else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--q", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--extra", default="", help="more overrides for every run, e.g. 'privacy.clip_norm=0.5'")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: temporary)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    print("| target epsilon | epsilon spent (delta 1e-5) | held-out exact match |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for target in [None, *args.epsilons]:
            cell = overrides(args.clients, args.q, args.rounds, target, args.extra)
            label = "no DP" if target is None else f"{target:g}"
            if args.dry_run:
                print(f"| {label} | `{cell}` | |")
                continue
            acc, eps = accuracy_and_epsilon(run_cell(cell, args.clients, Path(tmp), f"dp-{label.replace(' ', '')}"))
            spent = "-" if eps is None else f"{eps:.2f}"
            print(f"| {label} | {spent} | {'failed' if acc is None else f'{acc:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()

"""Canary exposure with and without DP (Carlini et al., "The Secret Sharer"; docs/privacy.md, "Canary exposure").

Each setting is one real ``flwr run`` simulation (own FLWR_HOME, free ports; :mod:`flower_cells`) with the same
canaries (``privacy.canaries``: ``--count`` secrets of ``--digits`` digits, each ``--repeats`` times in partition
0's training rows): one without DP, then one per ``--noise`` multiplier with DP-FedAvg at clip norm ``--clip``.
The server measures each canary's exposure in the final global adapter (and in the initial one) and writes it to
summary.json; this script prints a markdown table of them. Usage::

    python benchmarks/canary.py --clients 10 --sample 5 --rounds 10 --noise 0.5 1.0 > canary.md
    python benchmarks/canary.py --dry-run   # the runs it would make

Not a test. Under DP every client is Poisson-sampled with q = sample / clients, so the canary client trains only
in some rounds; with few clients the noise (z C / (q N) per coordinate) also drowns what the others teach.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flower_cells import run_cell, summary_of

HEADER = (
    "| setting | epsilon spent (delta) | mean exposure | max exposure | mean exposure, initial adapter | "
    "log2 \\|R\\| (the most) | held-out exact match |\n|---|---|---|---|---|---|---|"
)


def overrides(args: argparse.Namespace, noise: float | None) -> str:
    """The run config of one setting; ``noise`` None: no DP."""
    canaries = (
        f"privacy.canaries.count={args.count} privacy.canaries.repeats={args.repeats} "
        f"privacy.canaries.digits={args.digits} privacy.canaries.partition=0"
    )
    base = (
        f"num_clients={args.clients} sample_clients={args.sample} num_rounds={args.rounds} baseline=none "
        f"{canaries} {args.extra}"
    ).strip()
    if noise is None:
        return base
    return f"{base} privacy.dp=true privacy.noise_multiplier={noise} privacy.clip_norm={args.clip}"


def label(noise: float | None, clip: float) -> str:
    return "no DP" if noise is None else f"DP z={noise:g} C={clip:g}"


def row(name: str, run: Path | None) -> str:
    """One table row from a run folder (summary.json, metrics.jsonl); ``failed`` when the run did not complete."""
    summary = summary_of(run)
    if summary is None or "canary_exposure" not in summary:
        return f"| {name} | failed | | | | | |"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    spent = f"{last['epsilon']:.2f} ({last['delta']:g})" if "epsilon" in last else "-"
    e = summary["canary_exposure"]
    accuracy = summary.get("final", {}).get("accuracy")
    return (
        f"| {name} | {spent} | {e['mean']:.2f} | {e['max']:.2f} | {e['initial']['mean']:.2f} | "
        f"{e['log2_space']:.2f} | {'-' if accuracy is None else f'{accuracy:.3f}'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sample", type=int, default=5, help="clients per round (under DP: q = sample / clients)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--noise", nargs="+", type=float, default=[1.0], help="DP noise multipliers z")
    parser.add_argument("--clip", type=float, default=1.0, help="DP clip norm C")
    parser.add_argument("--count", type=int, default=5, help="canaries")
    parser.add_argument("--repeats", type=int, default=20, help="copies of each canary in partition 0")
    parser.add_argument("--digits", type=int, default=6, help="digits of a secret: |R| = 10^digits")
    parser.add_argument("--extra", default="", help="more overrides for every run, e.g. 'training.max_steps=20'")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: temporary)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for noise in [None, *args.noise]:
            cell, name = overrides(args, noise), label(noise, args.clip)
            if args.dry_run:
                print(f"| {name} | `{cell}` | | | | | |")
                continue
            run = run_cell(cell, args.clients, Path(tmp), name.replace(" ", "-").replace("=", ""), args.timeout)
            print(row(name, run), flush=True)


if __name__ == "__main__":
    main()

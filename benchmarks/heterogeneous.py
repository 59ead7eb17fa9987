"""Accuracy of heterogeneous LoRA ranks (HetLoRA, FlexLoRA) against homogeneous ranks (docs/heterogeneous.md).

The built-in benchmark (FedAvg, 4 simulated clients, all sampled, 15 rounds by default) per setting and
seed, one ``flwr run`` each: clients of ranks {4, 8, 16, 32} under HetLoRA and under FlexLoRA (global
rank 32; HetLoRA also with its rank self-pruning, ``hetlora_prune``), and every client at rank 4 and at
rank 32. The alphas keep one LoRA scaling (alpha / r = 2) in
all four. Usage::

    python benchmarks/heterogeneous.py --seeds 0 1 2 > heterogeneous.md
    python benchmarks/heterogeneous.py --dry-run   # the runs it would make

Not a test: it prints a markdown table (final held-out exact match, mean ± sd over seeds, and each seed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from flower_cells import final_accuracy, mean_sd, run_cell

SETTINGS = {
    "HetLoRA, ranks 4/8/16/32": "lora_aggregation=hetlora model.lora.r=32 model.lora.alpha=64 "
    "model.lora.client_ranks=[4,8,16,32]",
    "HetLoRA per-rank average, ranks 4/8/16/32": "lora_aggregation=hetlora hetlora_average=per_rank "
    "model.lora.r=32 model.lora.alpha=64 model.lora.client_ranks=[4,8,16,32]",
    "HetLoRA with rank self-pruning, ranks 4/8/16/32": "lora_aggregation=hetlora hetlora_prune.enabled=true "
    "model.lora.r=32 model.lora.alpha=64 model.lora.client_ranks=[4,8,16,32]",
    "HetLoRA frozen tail, ranks 4/8/16/32": "lora_aggregation=hetlora hetlora_tail=frozen "
    "model.lora.r=32 model.lora.alpha=64 model.lora.client_ranks=[4,8,16,32]",
    "HetLoRA frozen tail, summed updates, ranks 4/8/16/32": "lora_aggregation=hetlora hetlora_tail=frozen_sum "
    "model.lora.r=32 model.lora.alpha=64 model.lora.client_ranks=[4,8,16,32]",
    "FlexLoRA, ranks 4/8/16/32": "lora_aggregation=flexlora model.lora.r=32 model.lora.alpha=64 "
    "model.lora.client_ranks=[4,8,16,32]",
    "FlexLoRA update average, ranks 4/8/16/32": "lora_aggregation=flexlora flexlora_average=updates "
    "model.lora.r=32 model.lora.alpha=64 model.lora.client_ranks=[4,8,16,32]",
    "homogeneous r=4": "model.lora.r=4 model.lora.alpha=8",
    "homogeneous r=32": "model.lora.r=32 model.lora.alpha=64",
}


def overrides(setting: str, seed: int, rounds: int) -> str:
    """The run config of one (setting, seed) cell."""
    return f"num_clients=4 num_rounds={rounds} seed={seed} baseline=none strategy=fedavg {SETTINGS[setting]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    print("| setting | exact match (mean ± sd) | per seed |\n|---|---|---|")
    if args.dry_run:
        for setting in args.settings:
            print(f"| {setting} | `{overrides(setting, args.seeds[0], args.rounds)}` | |")
        return
    accs: dict[str, list[float | None]] = {setting: [] for setting in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seed by seed: a table cut short still compares every setting
            for setting in args.settings:
                name = f"{setting.split(',')[0].replace(' ', '-').replace('=', '')}-{seed}"
                accs[setting].append(
                    final_accuracy(run_cell(overrides(setting, seed, args.rounds), 4, Path(tmp), name))
                )
                print(f"{setting} seed {seed}: {accs[setting][-1]}", file=sys.stderr, flush=True)
    for setting, values in accs.items():
        per_seed = ", ".join("failed" if a is None else f"{a:.3f}" for a in values)
        print(f"| {setting} | {mean_sd(values)} | {per_seed} |", flush=True)


if __name__ == "__main__":
    main()

"""One benchmark cell = one real ``flwr run`` simulation; the helpers the table-making scripts share.

Each cell gets its own FLWR_HOME and free ports (``FlowerRunner``), so cells never see each other's state,
and its Flower processes are killed when it ends, finished or not. A cell that fails or runs past its
timeout is reported as missing (``None``), so one bad cell never loses a table's other cells.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes


def run_cell(cell: str, clients: int, work: Path, name: str, timeout: int = 3600) -> Path | None:
    """Run the overrides ``cell`` with ``clients`` simulated SuperNodes; its run folder, or None if it failed."""
    home = work / "homes" / name
    home.mkdir(parents=True)
    try:
        status, _ = FlowerRunner(home).run(
            f"{cell} output_dir={work / 'out'} run_name={name}", num_supernodes=clients, timeout=timeout
        )
    except (subprocess.TimeoutExpired, RuntimeError) as error:
        print(f"{name}: {type(error).__name__}: {str(error)[-500:]}", file=sys.stderr, flush=True)
        return None
    finally:
        kill_flower_processes(str(home))
    run = work / "out" / name
    if status != "finished:completed" or not (run / "summary.json").is_file():
        print(f"{name}: ended {status}", file=sys.stderr, flush=True)
        return None
    return run


def summary_of(run: Path | None) -> dict | None:
    """The run's summary.json (None for a failed cell)."""
    return None if run is None else json.loads((run / "summary.json").read_text())


def final_accuracy(run: Path | None) -> float | None:
    """Final held-out exact match of a run (None for a failed cell)."""
    summary = summary_of(run)
    return None if summary is None else summary["final"].get("accuracy")


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` over seeds (sample sd; 0 for one value); ``failed`` when none completed."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "failed"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"

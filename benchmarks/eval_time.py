"""Wall time of ``fedllm-eval CHECKPOINT --bench all --data-dir tests/fixtures/evaluation`` on a demo checkpoint.

Makes the checkpoint with a real 1-round demo run through ``flwr run`` (own FLWR_HOME, free ports), then
runs the CLI as a user would. Usage::

    python benchmarks/eval_time.py [--overrides "num_rounds=1 baseline=none"] [--keep DIR]

Not a test: it prints a markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overrides", default="num_rounds=1 baseline=none")
    parser.add_argument("--keep", help="copy the demo run (checkpoint and eval/) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        out = Path(tmp) / "out"
        try:
            status, log = FlowerRunner(home).run(f"{args.overrides} output_dir={out} run_name=demo", num_supernodes=4)
        finally:
            kill_flower_processes(str(home))
        if status != "finished:completed":
            raise SystemExit(f"demo run failed ({status}):\n{log[-3000:]}")
        ckpt = sorted((out / "demo" / "checkpoints").iterdir())[-1]
        cmd = ["fedllm-eval", str(ckpt), "--bench", "all", "--data-dir", str(REPO / "tests/fixtures/evaluation")]
        start = time.perf_counter()
        subprocess.run([*cmd, "--no-progress"], check=True, capture_output=True)
        wall = time.perf_counter() - start
        report = json.loads((ckpt / "eval" / "all.json").read_text())
        print("| figure | value |\n|---|---|")
        shown = "fedllm-eval <checkpoint> --bench all --data-dir tests/fixtures/evaluation"
        print(f"| `{shown}` wall time | {wall:.1f} s |")
        print(f"| of which benchmarks (model loaded) | {report['total_seconds']:.1f} s |")
        slowest = sorted(report["benchmarks"].items(), key=lambda kv: -kv[1]["seconds"])[:3]
        print("| slowest benchmarks | " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in slowest) + " |")
        if args.keep:
            shutil.copytree(out / "demo", args.keep, dirs_exist_ok=True)


if __name__ == "__main__":
    main()

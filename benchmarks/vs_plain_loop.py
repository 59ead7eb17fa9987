"""The demo through fedllm against a plain single-process loop of the same steps (issue 18's second goal).

fedllm side: the README's demo, ``flwr run`` with 4 SuperNodes of one CPU each and the default config
(the tiny model, 4 clients all sampled, 15 rounds of 40 steps of batch 16, FedAvg, then the local-only
baseline of the same steps, the server's held-out evaluation every round).

Plain side: one Python process, no Flower, no evaluation, as a researcher's first script would be: the same
tiny model, the same partitions and per-round rows (fedllm's data pipeline and round sampling), each client
round a new TRL ``SFTTrainer`` with the same ``SFTConfig`` (it tokenises that round's rows), clients one after
the other at torch's default thread count, the example-weighted mean of the adapters; then each client alone
for the same rounds (the local-only baseline).

    python benchmarks/vs_plain_loop.py [--rounds 15] [--json out.json]

Both sides start from a built tiny model (built first if missing; not timed). Not a test: it prints a
markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_loop(rounds: int) -> dict:
    """The plain side, in this process; its seconds from the process's start."""
    import numpy as np
    from trl import SFTTrainer

    from fedllm_app.client.trainer import trainer_config
    from fedllm_app.config import load_config
    from fedllm_app.data.pipeline import partition
    from fedllm_app.data.sampling import round_indices
    from fedllm_app.data.trl_form import to_trl
    from fedllm_app.model import get_adapter, get_model, initial_adapter, set_adapter
    from strategies.schedule import cosine_lr

    cfg = load_config({"overrides": f"num_rounds={rounds}"})
    model, tokenizer = get_model(cfg.model, cfg.seed)
    rows = [partition(cfg, pid) for pid in range(cfg.num_clients)]
    t = cfg.training
    started = time.perf_counter()

    def client_round(pid: int, rnd: int, start: dict) -> dict:
        set_adapter(model, start)
        lr = cosine_lr(rnd, cfg.num_rounds, t.learning_rate, t.min_learning_rate)
        with tempfile.TemporaryDirectory() as out:
            args = trainer_config(cfg, lr, cfg.seed * 100_003 + rnd, out)
            data = to_trl([rows[pid][i] for i in round_indices(len(rows[pid]), cfg, rnd, pid)], t.template)
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
        return get_adapter(model)

    weights = np.array([len(r) for r in rows], dtype=np.float64) / sum(len(r) for r in rows)
    fedavg, local = [], []
    global_ = initial_adapter(cfg.model, cfg.seed)
    for rnd in range(1, rounds + 1):
        begin = time.perf_counter()
        trained = [client_round(pid, rnd, global_) for pid in range(cfg.num_clients)]
        global_ = {k: sum(w * a[k] for w, a in zip(weights, trained, strict=True)) for k in global_}
        fedavg.append(time.perf_counter() - begin)
    own = [initial_adapter(cfg.model, cfg.seed) for _ in rows]
    for rnd in range(1, rounds + 1):
        begin = time.perf_counter()
        own = [client_round(pid, rnd, own[pid]) for pid in range(cfg.num_clients)]
        local.append(time.perf_counter() - begin)
    return {"before_round_1": started, "fedavg_rounds": fedavg, "local_rounds": local}


def run_plain(rounds: int, work: Path) -> dict:
    """The plain side in a fresh Python process (imports counted, as fedllm's are); wall from its launch."""
    out = work / "plain.json"
    launched = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--plain-only", "--rounds", str(rounds), "--json", str(out)],
                   check=True, cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - launched
    return {"wall": wall, **json.loads(out.read_text())}


def run_fedllm(rounds: int, work: Path) -> dict:
    """The README's demo through ``flwr run``; per-round seconds of each phase from its metrics.jsonl."""
    from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

    home = work / "home"
    home.mkdir()
    runner = FlowerRunner(home)
    launched = time.time()
    try:
        status, log = runner.run(f"num_rounds={rounds} output_dir={work / 'out'} run_name=demo", num_supernodes=4,
                                 timeout=3600)  # fmt: skip
    finally:
        kill_flower_processes(str(home))
    if status != "finished:completed":
        raise SystemExit(f"fedllm run ended {status}:\n{log[-3000:]}")
    run = work / "out" / "demo"
    fedavg, local = (
        [json.loads(x) for x in (run / name).read_text().splitlines()]
        for name in ("metrics.jsonl", "baseline_local/metrics.jsonl")
    )
    return {
        "wall": (runner.exited_at or time.time()) - launched,
        "before_round_1": fedavg[0]["started_at"] - launched,
        "fedavg_rounds": [float(r["seconds"]) for r in fedavg],
        "local_rounds": [float(r["seconds"]) for r in local],
    }


def steady(values: list[float]) -> float:
    """Mean of the rounds after the first two (the first ones load, tokenise and warm caches)."""
    return statistics.mean(values[2:] or values)


def table(ours: dict, plain: dict) -> str:
    head = "| | total wall | launch to round 1 | FedAvg round 1 | FedAvg later rounds, mean | local-only rounds, mean |"
    lines = [head, "|---|---|---|---|---|---|"]
    for name, r in (("fedllm (flwr run)", ours), ("plain loop", plain)):
        lines.append(f"| {name} | {r['wall']:.1f} s | {r['before_round_1']:.1f} s | {r['fedavg_rounds'][0]:.2f} s | "
                     f"{steady(r['fedavg_rounds']):.2f} s | {steady(r['local_rounds']):.2f} s |")  # fmt: skip
    lines.append(f"| fedllm / plain | {ours['wall'] / plain['wall']:.2f}x | | | "
                 f"{steady(ours['fedavg_rounds']) / steady(plain['fedavg_rounds']):.2f}x | "
                 f"{steady(ours['local_rounds']) / steady(plain['local_rounds']):.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_only:
        launched = time.perf_counter() - _process_age()
        result = plain_loop(args.rounds)
        result["before_round_1"] -= launched
        args.json.write_text(json.dumps(result))
        return
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from fedllm_app.config import load_config
    from fedllm_app.model import get_model

    get_model(load_config({}).model)  # builds the tiny model once if this machine has none (not timed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours, plain = run_fedllm(args.rounds, work), run_plain(args.rounds, work)
    print(table(ours, plain))
    if args.json:
        args.json.write_text(json.dumps({"fedllm": ours, "plain": plain}, indent=1))


def _process_age() -> float:
    from fedllm_app.client.round import process_age

    return process_age()


if __name__ == "__main__":
    main()

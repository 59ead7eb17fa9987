"""CPU and wall seconds of one server-side held-out evaluation on issue 18's workload (SFT or DPO).

Builds the workload offline (:func:`vs_openfedllm.build_workload`: 4,000 rows, a SentencePiece vocabulary of
1,024, a random 2-layer Llama), loads it as the server does, and times the evaluation the ServerApp runs each
round: the held-out loss (SFT, no exact match) or the DPO held-out metrics against the reference. Usage::

    python benchmarks/heldout_eval_time.py --task sft --threads 1 [--repeats 5]

Not a test: it prints one line per repeat to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_openfedllm import build_workload, fedllm_overrides  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from fedllm_app.config import load_config
    from fedllm_app.data import pipeline
    from fedllm_app.model import get_model

    with tempfile.TemporaryDirectory() as tmp:
        rows, model_dir = build_workload(Path(tmp), 4000, args.task)
        cfg = load_config({}, fedllm_overrides(model_dir, rows, 20, args.task).split())
        torch.set_num_threads(args.threads)
        model, tokenizer = get_model(cfg.model, cfg.seed)
        test = pipeline.heldout(cfg)
        if args.task == "dpo":
            from evaluation.preferences import HeldoutPreferences

            scorer = HeldoutPreferences(model, tokenizer, test, cfg)
            evaluate = lambda: scorer.evaluate(model)  # noqa: E731
        else:
            from evaluation.heldout import HeldoutRows

            rows_scorer = HeldoutRows(tokenizer, test, cfg.training)
            evaluate = lambda: rows_scorer.evaluate(model, exact=False)  # noqa: E731
        evaluate()  # warm-up
        for _ in range(args.repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            metrics = evaluate()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"{args.task}, {len(test)} held-out rows, {args.threads} thread(s): {cpu:.3f} s CPU, {wall:.3f} s "
                  f"wall; eval_loss {metrics['eval_loss']:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()

"""``fedllm-eval``: score a checkpoint on the benchmarks; ``fedllm-eval merge`` (or ``fedllm-merge``) merges it.

    fedllm-eval outputs/fedavg-synthetic-seed0/checkpoints/round-15 --bench finance
    fedllm-eval CHECKPOINT --bench all --data-dir tests/evaluation/fixtures
    fedllm-eval merge CHECKPOINT OUT_DIR

The same runs as a Hydra-configured module: ``python -m evaluation checkpoint=CHECKPOINT bench=finance``
(config ``conf/eval.yaml``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from evaluation.judge import JudgeConfig
from evaluation.runner import GROUPS, EvalSettings, expand, run_suite, write_results


def evaluate_checkpoint(checkpoint: str | Path, settings: EvalSettings) -> dict[str, Any]:
    """Load the checkpoint, run ``settings.bench`` and write ``<checkpoint>/eval/<bench>.{json,md}``."""
    from evaluation.checkpoint import checkpoint_config, load_for_eval
    from evaluation.generation import Generator

    names = expand(settings.bench)  # fail on a bad name before loading anything
    start = time.perf_counter()
    cfg = checkpoint_config(checkpoint, settings.overrides)
    threads = settings.threads or cfg.training.get("num_threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer = load_for_eval(checkpoint, cfg)
    gen = Generator(model, tokenizer, cfg.training.template, settings.batch_size, progress=settings.progress)
    out_dir = Path(checkpoint).expanduser() / "eval"
    results = run_suite(gen, names, settings, out_dir, cfg)
    meta = {
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "base_model": str(cfg.model.name),
        "template": cfg.training.template,
        "data_dir": settings.data_dir,
        "limit": settings.limit,
        "total_seconds": round(time.perf_counter() - start, 2),
    }
    js, md = write_results(out_dir, settings.bench, results, meta)
    print(f"[fedllm-eval] wrote {js} and {md} in {meta['total_seconds']:.0f} s", flush=True)
    return results


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedllm-eval",
        description="Score a fedllm checkpoint (PEFT adapter folder or merged model) on benchmarks. "
        "'fedllm-eval merge CHECKPOINT OUT' writes the adapter merged into its base model.",
    )
    p.add_argument("checkpoint", help="checkpoints/round-N folder (adapter) or a merged model folder")
    p.add_argument(
        "--bench", default="all", help=f"{', '.join(GROUPS)}, all, or comma-separated benchmark names (default all)"
    )
    p.add_argument("--data-dir", help="read <benchmark>.jsonl files from this folder instead of the Hub")
    p.add_argument("--limit", type=int, help="at most this many rows per benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=0, help="solved examples before each MMLU question (e.g. 5)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="for math, code and open-ended answers")
    p.add_argument("--code-samples", type=int, default=1, help="samples per coding problem (pass@k for k <= n)")
    p.add_argument("--code-temperature", type=float, default=0.8)
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per program in the sandbox")
    p.add_argument("--judge-base-url", help="OpenAI-compatible API root for MT-Bench/Vicuna grading")
    p.add_argument("--judge-model", help="judge model name")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    p.add_argument("--judge-cache", default="~/.cache/fedllm/judge", help="folder of cached judgements")
    p.add_argument("--judge-workers", type=int, default=8, help="judge requests in flight at once")
    p.add_argument("--override", action="append", default=[], help="run-config override, e.g. model.quantization=4bit")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the run's training.num_threads)")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(a: argparse.Namespace) -> EvalSettings:
    judge = None
    if a.judge_base_url or a.judge_model:
        if not (a.judge_base_url and a.judge_model):
            raise SystemExit("fedllm-eval: give both --judge-base-url and --judge-model (or neither)")
        judge = JudgeConfig(a.judge_base_url, a.judge_model, a.judge_key_env, a.judge_cache, workers=a.judge_workers)
    return EvalSettings(
        bench=a.bench,
        data_dir=a.data_dir,
        limit=a.limit,
        batch_size=a.batch_size,
        seed=a.seed,
        progress=not a.no_progress,
        code_samples=a.code_samples,
        code_temperature=a.code_temperature,
        code_timeout=a.code_timeout,
        max_new_tokens=a.max_new_tokens,
        judge=judge,
        overrides=list(a.override),
        threads=a.threads,
        shots=a.shots,
    )


def merge_main(argv: list[str]) -> None:
    from evaluation.checkpoint import merge

    p = argparse.ArgumentParser(prog="fedllm-eval merge", description="Merge a LoRA checkpoint into its base model.")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--override", action="append", default=[], help="run-config override, e.g. model.dtype=bfloat16")
    a = p.parse_args(argv)
    print(f"[fedllm-eval] merged model written to {merge(a.checkpoint, a.out, a.override)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fedllm-eval``."""
    from evaluation.judge import JudgeError
    from evaluation.sources import DataSourceError
    from fedllm_app.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "merge":
            merge_main(argv[1:])
            return
        args = eval_parser().parse_args(argv)
        evaluate_checkpoint(args.checkpoint, settings_from_args(args))
    except (ConfigError, DataSourceError, JudgeError) as err:
        raise SystemExit(f"fedllm-eval: {err}") from None


def merge_entry() -> None:
    """Entry point of ``fedllm-merge``."""
    main(["merge", *sys.argv[1:]])

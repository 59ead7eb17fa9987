"""Benchmark registry and suite runner: which benchmarks make up each ``--bench`` group, run them, write results.

Results go to ``<checkpoint>/eval/<bench>.json`` (every metric, timings, and for each benchmark its
``protocol``, the reference implementation and version its headline number follows, and ``data``, where its
rows really came from) and ``<checkpoint>/eval/<bench>.md`` (one table row per metric, then both). Two
numbers belong in one table only when both agree.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation import coding, finance, maths, multiple_choice, open_ended, safety
from evaluation.documented import documented
from evaluation.generation import Generator
from evaluation.judge import JudgeClient, JudgeConfig, load_prompts
from evaluation.sandbox import resolve_backend
from evaluation.sources import DataSourceError, Source, load_benchmark, load_rows
from fedllm_app.config import ConfigError

log = logging.getLogger("fedllm")

GROUPS: dict[str, tuple[str, ...]] = {
    "finance": tuple(finance.SOURCES),
    "general": ("mmlu", "mt_bench", "vicuna"),
    "medical": ("medqa", "medmcqa", "pubmedqa", "careqa"),
    "code": tuple(coding.SOURCES),
    "math": tuple(maths.SOURCES),
    "safety": tuple(safety.SOURCES),
    "heldout": ("heldout",),
}
SOURCES: dict[str, Source] = {
    **finance.SOURCES,
    **multiple_choice.SOURCES,
    **maths.SOURCES,
    **coding.SOURCES,
    **open_ended.SOURCES,
    **safety.SOURCES,
}
BENCHMARKS: tuple[str, ...] = tuple(b for names in GROUPS.values() for b in names)


def protocol(name: str) -> dict[str, str]:
    """The protocol benchmark ``name``'s headline number follows: its reference implementation and version
    (a module's ``PROTOCOLS[name]`` or ``PROTOCOL``; fedllm's own where the module names none).
    """
    for module in (finance, multiple_choice, maths, coding, open_ended, safety):
        if name in module.SOURCES:
            found = getattr(module, "PROTOCOLS", {}).get(name) or getattr(module, "PROTOCOL", None)
            return dict(found) if found else own_protocol(module.__name__)
    return own_protocol("evaluation.heldout")


def own_protocol(module: str) -> dict[str, str]:
    """The protocol of a benchmark scored by fedllm's own prompt and rules, versioned by fedllm's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("fedllm")
    except PackageNotFoundError:
        own = "unknown"
    return {"reference": f"fedllm's own prompt and scoring ({module})", "version": f"fedllm {own}"}


@documented
@dataclass
class EvalSettings:
    """What ``fedllm-eval`` runs and how; each field is one of its flags (``--max-new-tokens`` for
    ``max_new_tokens``), with this default and help text.
    """

    bench: str = field(
        default="all",
        metadata={"help": f"A group ({', '.join(GROUPS)}, all) or comma-separated benchmark names (e.g. gsm8k,mmlu)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of local benchmark files (<benchmark>.jsonl, .json, .parquet, .csv); unset: the Hub."
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "A seeded random sample of this many rows per benchmark (MMLU: stratified by subject; "
            "unset: all rows)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation / scoring batch."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the --limit sample and of torch (sampled MT-Bench / Vicuna / AdvBench answers, "
            "pass@k samples)."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars (--no-progress hides them)."})
    code_samples: int = field(
        default=1,
        metadata={"help": "Samples per coding problem (1: greedy pass@1; n > 1: sampled, pass@k for k <= n)."},
    )
    code_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature when code_samples > 1."})
    code_timeout: float = field(default=10.0, metadata={"help": "Wall-clock seconds per program in the sandbox."})
    allow_weak_sandbox: bool = field(
        default=False,
        metadata={
            "help": "Run generated code even where neither bubblewrap nor Linux namespaces can isolate it (only "
            "resource limits, Landlock and an audit hook hold then); off: the code benchmarks refuse to run."
        },
    )
    max_new_tokens: int = field(
        default=512, metadata={"help": "Generation length for math, code and open-ended answers."}
    )
    judge: JudgeConfig | None = field(
        default=None,
        metadata={"help": "LLM judge for MT-Bench / Vicuna (the --judge-* flags); unset: answers are only saved."},
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Hydra-style key=value override of the checkpoint's run config, e.g. model.quantization=4bit "
            "(repeatable)."
        },
    )
    shots: int = field(
        default=0,
        metadata={"help": "Solved examples before each MMLU question (5 is usual; other benchmarks stay zero-shot)."},
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "Torch CPU threads; unset: the run's training.num_threads (0 there: torch's default)."},
    )
    challenge: str | None = field(
        default=None,
        metadata={
            "help": "A FlowerTune LLM leaderboard challenge (general_nlp, finance, medical, code): run its "
            "benchmarks with the board's protocol and write its table row (docs/flowertune.md); --bench is ignored."
        },
    )


def expand(bench: str) -> list[str]:
    """The benchmark names of a group, ``all``, or a comma-separated list; an unknown name is an error."""
    out: list[str] = []
    for part in (p.strip() for p in bench.split(",") if p.strip()):
        if part == "all":
            out += BENCHMARKS
        elif part in GROUPS:
            out += GROUPS[part]
        elif part in BENCHMARKS:
            out.append(part)
        else:
            raise ConfigError(
                f"unknown benchmark {part!r}; choose a group ({', '.join(GROUPS)}, all) or one of: "
                f"{', '.join(BENCHMARKS)}"
            )
    if not out:
        raise ConfigError("no benchmark given; e.g. --bench finance")
    return list(dict.fromkeys(out))


def run_one(name: str, gen: Generator, settings: EvalSettings, out_dir: Path, run_cfg: Any = None) -> dict[str, Any]:
    """Load ``name``'s rows and score them; the metrics name the protocol and where the rows came from."""
    if name == "heldout":
        return {**heldout_metrics(gen, run_cfg, settings.limit), "protocol": protocol(name)}
    rows, origin = load_benchmark(SOURCES[name], settings.data_dir, settings.limit, settings.seed)
    if not rows:
        raise DataSourceError(f"benchmark {name!r} has no rows at {origin['location']}")
    return {**score(name, gen, rows, settings, out_dir), "protocol": protocol(name), "data": origin}


def score(name: str, gen: Generator, rows: list[dict], settings: EvalSettings, out_dir: Path) -> dict[str, Any]:
    """Benchmark ``name``'s metrics on ``rows``."""
    s = settings
    if name in finance.SOURCES:
        return finance.evaluate(gen, name, rows)
    if name in multiple_choice.SOURCES:
        dev = multiple_choice.DEV_SOURCES.get(name)
        dev_rows = load_rows(dev, s.data_dir) if s.shots and dev else None
        return multiple_choice.evaluate(gen, name, rows, s.shots if dev else 0, dev_rows)
    if name in maths.SOURCES:
        return maths.evaluate(gen, name, rows, max_new_tokens=s.max_new_tokens)
    if name in coding.SOURCES:
        code = {"max_new_tokens": s.max_new_tokens, "allow_weak_sandbox": s.allow_weak_sandbox}
        return coding.evaluate(gen, name, rows, s.code_samples, s.code_temperature, s.code_timeout, **code)
    if name in open_ended.SOURCES:
        judge = JudgeClient(s.judge, load_prompts(s.data_dir)) if s.judge else None
        return open_ended.evaluate(gen, name, rows, judge, out_dir, s.max_new_tokens)
    return safety.evaluate(gen, name, rows)


def heldout_metrics(gen: Generator, run_cfg: Any, limit: int | None) -> dict[str, Any]:
    """Held-out loss, perplexity and exact match on the run's built-in synthetic held-out split."""
    import math

    from evaluation.heldout import evaluate_adapter
    from fedllm_app.config import load_config
    from fedllm_app.data import pipeline

    cfg = run_cfg if run_cfg is not None else load_config({})
    rows = pipeline.heldout(cfg)[:limit] if limit else pipeline.heldout(cfg)
    metrics: dict[str, Any] = evaluate_adapter(gen.model, gen.tokenizer, rows, cfg.training)
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics["n"] = len(rows)
    return metrics


def run_suite(
    gen: Generator, names: list[str], settings: EvalSettings, out_dir: Path, run_cfg: Any = None
) -> dict[str, Any]:
    """Run ``names`` in order; returns ``{benchmark: metrics}`` with each one's seconds. The raw generations
    of each benchmark are saved to ``<out_dir>/<benchmark>_generations.jsonl`` for inspection.
    """
    import torch

    results: dict[str, Any] = {}
    for name in names:
        torch.manual_seed(settings.seed)
        start = time.perf_counter()
        gen.record = []
        try:
            metrics = run_one(name, gen, settings, out_dir, run_cfg)
        finally:
            generations, gen.record = gen.record, None
        if generations:
            out_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(g) + "\n" for g in generations)
            (out_dir / f"{name}_generations.jsonl").write_text(lines)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = metrics
        log.info("%s: %s", name, summary_line(metrics))
    return results


def summary_line(metrics: dict[str, Any]) -> str:
    keys = [k for k, v in metrics.items() if isinstance(v, float) and "/" not in k and k != "seconds"]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys[:4]) + f" (n={metrics.get('n')}, {metrics['seconds']} s)"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per benchmark and top-level or group metric (per-subject scores stay in the JSON)."""
    lines = ["| benchmark | metric | value |", "|---|---|---|"]
    for name, metrics in results.items():
        for key, value in metrics.items():
            if key in ("n", "seconds") or key.count("/") > 1 or not isinstance(value, int | float):
                continue
            cell = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {name} | {key} | {cell} |")
        lines.append(f"| {name} | rows (seconds) | {metrics.get('n')} ({metrics['seconds']} s) |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, bench: str, results: dict[str, Any], meta: dict[str, Any]) -> tuple[Path, Path]:
    """``<out_dir>/<bench>.json`` and ``<out_dir>/<bench>.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = bench.replace(",", "+")
    payload = {**meta, "benchmarks": results}
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(payload, indent=2))
    md = out_dir / f"{stem}.md"
    md.write_text(
        f"# fedllm-eval: {bench}\n\nCheckpoint: `{meta.get('checkpoint')}`\n\n{markdown_table(results)}\n"
        f"Protocols and data:\n\n{provenance_lines(results)}"
    )
    return js, md


def provenance_lines(results: dict[str, Any]) -> str:
    """One line per benchmark: its protocol's reference and version, and where its rows came from."""
    lines = []
    for name, metrics in results.items():
        proto, data = metrics.get("protocol") or {}, metrics.get("data") or {}
        where = f"{data.get('kind')} {data.get('location')}" if data else "the run's held-out split"
        sample = f", {data['sample']}" if data.get("sample") else ""
        lines.append(f"- {name}: {proto.get('reference')} ({proto.get('version')}); rows from {where}{sample}\n")
    return "".join(lines)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"bench/<benchmark>/<metric>": value}`` for the numeric metrics (for metrics.jsonl; per-subject
    scores stay in the benchmark's JSON).
    """
    return {
        f"bench/{name}/{k}": float(v)
        for name, m in results.items()
        for k, v in m.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "n" and k.count("/") <= 1
    }


def check_round_benchmarks(cfg: Any) -> None:
    """Validate the ServerApp's ``eval`` keys at start (unknown benchmark, negative period)."""
    ev = cfg.get("eval")
    if ev is None:
        return
    if int(ev.every) < 0:
        raise ConfigError(f"eval.every={ev.every} must be >= 0 (0 = never); e.g. eval.every=5")
    if ev.every and ev.benches:
        names = set(expand(",".join(ev.benches)))
        if {"mt_bench", "vicuna"} & names:
            raise ConfigError("eval.benches: mt_bench and vicuna need a judge; run them with fedllm-eval instead")
        if names & set(coding.SOURCES):
            resolve_backend(allow_weak=bool(ev.get("allow_weak_sandbox", False)))  # fail now, not at round N


def round_benchmarks(cfg: Any, model: Any, tokenizer: Any, rnd: int, out_dir: Path) -> dict[str, float]:
    """The ServerApp's light benchmarks on the current global model, every ``eval.every`` rounds and at the
    last round; ``{"bench/<benchmark>/<metric>": value}`` (empty in other rounds or when switched off).
    """
    ev = cfg.get("eval")
    if ev is None or not ev.every or not ev.benches or (rnd % ev.every and rnd != cfg.num_rounds):
        return {}
    settings = EvalSettings(
        bench=",".join(ev.benches),
        data_dir=ev.data_dir,
        limit=ev.limit,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        progress=False,
        allow_weak_sandbox=bool(ev.get("allow_weak_sandbox", False)),
    )
    gen = Generator(model, tokenizer, cfg.training.template, ev.batch_size, cfg.training.max_new_tokens, False)
    start = time.perf_counter()
    results = run_suite(gen, expand(settings.bench), settings, out_dir / "eval" / f"round-{rnd}", cfg)
    write_results(out_dir / "eval", f"round-{rnd}", results, {"round": rnd, "data_dir": ev.data_dir})
    return {**flat_metrics(results), "bench_seconds": time.perf_counter() - start}

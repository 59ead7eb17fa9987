"""``fedllm-eval``: score a checkpoint on the benchmarks; ``fedllm-eval merge`` (or ``fedllm-merge``) merges it.

    fedllm-eval outputs/fedavg-synthetic-seed0/checkpoints/round-15 --bench finance
    fedllm-eval CHECKPOINT --bench all --data-dir tests/fixtures/evaluation
    fedllm-eval CHECKPOINT --config eval.yaml      # flag values from a YAML/JSON file; command-line flags win
    fedllm-eval merge CHECKPOINT OUT_DIR

The flags are derived by ``transformers.HfArgumentParser`` from :class:`evaluation.runner.EvalSettings` (each
field a flag: ``max_new_tokens`` is ``--max-new-tokens``) and :class:`evaluation.judge.JudgeConfig` (each field
``judge_<field>``: ``--judge-base-url``, ``--judge-model``...), so every default and help text is written once,
in those dataclasses. :data:`ALIASES` keeps the flag names of the earlier hand-written parser working.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import time
from dataclasses import MISSING, Field, asdict, field, fields, make_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from transformers import HfArgumentParser

from evaluation.judge import JudgeConfig, JudgeError
from evaluation.runner import EvalSettings, expand, run_suite, write_results
from evaluation.sources import DataSourceError
from fedllm_app.config import ConfigError
from fedllm_app.console import setup_console

log = logging.getLogger("fedllm")

JUDGE_PREFIX = "judge_"
# Flag names of the earlier hand-written parser, kept so that existing commands and docs stay valid.
ALIASES: dict[str, list[str]] = {
    "overrides": ["--override"],
    "judge_api_key_env": ["--judge-key-env"],
    "judge_cache_dir": ["--judge-cache"],
}


def _flag_field(name: str, hint: Any, source: Field) -> tuple[str, Any, Field]:
    """``source`` as the field ``name`` of a flag dataclass: same default and help, plus the flag's aliases.

    A list is declared as its item type with ``action="append"``: one item per flag, repeatable
    (``--override a=1 --override b=2``). A required field (the judge's URL and model) is optional as a flag.
    """
    metadata = {**source.metadata, "aliases": ALIASES.get(name, [])}
    if get_origin(hint) is list:
        hint, metadata["action"] = get_args(hint)[0], "append"
    if source.default_factory is not MISSING:
        return name, hint, field(default_factory=source.default_factory, metadata=metadata)
    if source.default is MISSING:
        return name, hint | None, field(default=None, metadata=metadata)
    return name, hint, field(default=source.default, metadata=metadata)


def flag_dataclass(name: str, source: type, prefix: str = "", skip: tuple[str, ...] = (), group: str = "") -> type:
    """A flat dataclass of ``source``'s fields (named ``<prefix><field>``) for ``HfArgumentParser``."""
    hints = get_type_hints(source)
    specs = [_flag_field(prefix + f.name, hints[f.name], f) for f in fields(source) if f.name not in skip]
    return make_dataclass(name, specs, namespace={"_argument_group_name": group} if group else {})


EvalFlags = flag_dataclass("EvalFlags", EvalSettings, skip=("judge",))
JudgeFlags = flag_dataclass("JudgeFlags", JudgeConfig, JUDGE_PREFIX, group="judge (MT-Bench, Vicuna)")


def eval_parser() -> HfArgumentParser:
    """``fedllm-eval``'s parser: the positional checkpoint, ``--config`` and one flag per settings field."""
    parser = HfArgumentParser(
        (EvalFlags, JudgeFlags),
        prog="fedllm-eval",
        description="Score a fedllm checkpoint (PEFT adapter folder or merged model) on benchmarks. "
        "'fedllm-eval merge CHECKPOINT OUT' writes the adapter merged into its base model.",
        allow_abbrev=False,
    )
    parser.add_argument("checkpoint", help="checkpoints/round-N folder (adapter) or a merged model folder")
    parser.add_argument(
        "--config",
        help="YAML or JSON file of flag values, keyed by flag name (bench: math, max_new_tokens: 64, "
        "overrides: [model.quantization=4bit]); flags on the command line win",
    )
    return parser


def config_argv(path: str) -> list[str]:
    """The flags written in a ``--config`` file, as ``--name=value`` (a list repeats a list flag; null skips)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--config {path!r} is not a file; give a YAML or JSON file such as 'bench: math'")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path!r} is not YAML or JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must map flag names to values, e.g. 'bench: math'")
    flag_fields = {f.name: f for f in (*fields(EvalFlags), *fields(JudgeFlags))}
    argv = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in flag_fields:
            near = difflib.get_close_matches(name, flag_fields, n=1)
            fix = f"did you mean {near[0]!r}?" if near else "the keys are the flag names (fedllm-eval --help)"
            raise ConfigError(f"--config {path!r}: unknown key {key!r}; {fix}")
        if isinstance(value, list) and "action" not in flag_fields[name].metadata:
            raise ConfigError(f"--config {path!r}: {key!r} takes one value, not a list")
        argv += [f"--{name}={item}" for item in (value if isinstance(value, list) else [value]) if item is not None]
    return argv


def parse_eval_args(argv: list[str]) -> tuple[str, EvalSettings]:
    """The checkpoint and settings of ``fedllm-eval CHECKPOINT [--config FILE] [flags]``."""
    parser = eval_parser()
    config = argparse.ArgumentParser(prog="fedllm-eval", add_help=False, allow_abbrev=False)
    config.add_argument("--config")
    path = config.parse_known_args(argv)[0].config
    file_argv = config_argv(path) if path else []
    flags, judge, extra, rest = parser.parse_args_into_dataclasses(
        [*file_argv, *argv], return_remaining_strings=True, look_for_args_file=False
    )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return extra.checkpoint, settings_from_flags(flags, judge)


def settings_from_flags(flags: Any, judge: Any) -> EvalSettings:
    """:class:`EvalSettings` from the parsed ``EvalFlags`` and ``JudgeFlags`` (the judge only with a URL and model)."""
    values = asdict(flags)
    judged = {f.name.removeprefix(JUDGE_PREFIX): getattr(judge, f.name) for f in fields(judge)}
    if bool(judged["base_url"]) != bool(judged["model"]):
        raise ConfigError(
            "give both --judge-base-url and --judge-model to grade MT-Bench and Vicuna (or neither to only save "
            "their answers)"
        )
    return EvalSettings(**values, judge=JudgeConfig(**judged) if judged["base_url"] else None)


def evaluate_checkpoint(checkpoint: str | Path, settings: EvalSettings) -> dict[str, Any]:
    """Load the checkpoint, run ``settings.bench`` and write ``<checkpoint>/eval/<bench>.{json,md}``."""
    from evaluation.checkpoint import checkpoint_config, load_for_eval
    from evaluation.generation import Generator

    if settings.challenge:
        return evaluate_challenge(checkpoint, settings)
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
    log.info("wrote %s and %s in %.0f s", js, md, meta["total_seconds"])
    return results


def evaluate_challenge(checkpoint: str | Path, settings: EvalSettings) -> dict[str, Any]:
    """The FlowerTune challenge's benchmarks with the board's protocol; writes and prints its table row
    (``<checkpoint>/eval/leaderboard-<challenge>.{md,json}``). The base model is loaded in 4-bit, as the board
    requires, wherever bitsandbytes can (a CUDA GPU and a Hub model; else as the run trained it, said in the JSON).
    """
    from evaluation import flowertune, multipl_e
    from evaluation.checkpoint import checkpoint_config, load_for_eval
    from evaluation.generation import Generator

    board = flowertune.challenge(settings.challenge)  # fail on a bad name or a missing compiler before loading
    for bench in board.benchmarks():
        multipl_e.require_tools(bench)
    start = time.perf_counter()
    cfg = checkpoint_config(checkpoint, settings.overrides)
    if settings.threads or cfg.training.get("num_threads"):
        import torch

        torch.set_num_threads(settings.threads or cfg.training.num_threads)
    cfg.model.quantization = eval_quantization(cfg, settings.overrides)
    if cfg.model.quantization == flowertune.BOARD_QUANTIZATION and not any(
        o.startswith("model.dtype=") for o in settings.overrides
    ):
        cfg.model.dtype = "float32"  # the board loads the 4-bit base with torch_dtype float32
    model, tokenizer = load_for_eval(checkpoint, cfg)
    # Raw prompts: the board's own text, with the tokenizer's BOS as its tokenizer adds it.
    gen = Generator(model, tokenizer, "alpaca", settings.batch_size, progress=settings.progress)
    results = flowertune.run_challenge(gen, settings.challenge, settings)
    evaluated = {"eval_quantization": cfg.model.quantization, "data_dir": settings.data_dir, "limit": settings.limit}
    row = flowertune.leaderboard_row(settings.challenge, results, cfg, Path(checkpoint).expanduser(), evaluated)
    meta = {
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        **evaluated,
        "total_seconds": round(time.perf_counter() - start, 2),
    }
    md = flowertune.write_row(Path(checkpoint).expanduser() / "eval", row, results, meta)
    print(md.read_text())
    log.info("wrote %s and %s in %.0f s", md, md.with_suffix(".json"), meta["total_seconds"])
    return {**results, "leaderboard_row": row}


def eval_quantization(cfg: Any, overrides: list[str]) -> str | None:
    """The board's 4-bit (bitsandbytes' default FP4, float32 compute: ``flowertune.BOARD_QUANTIZATION``) for a
    Hub or local model on a CUDA GPU unless an override sets model.quantization; else the run's own setting (the
    built-in tiny model and CPUs run unquantised; the row then says it is not a leaderboard entry).
    """
    import torch

    if any(o.startswith("model.quantization=") for o in overrides):
        return cfg.model.quantization
    if torch.cuda.is_available() and not str(cfg.model.name).startswith("builtin:"):
        from evaluation.flowertune import BOARD_QUANTIZATION

        return BOARD_QUANTIZATION
    return cfg.model.quantization


def merge_main(argv: list[str]) -> None:
    """``fedllm-eval merge CHECKPOINT OUT [--override KEY=VALUE]``."""
    from evaluation.checkpoint import merge

    overrides_help = next(f for f in fields(EvalSettings) if f.name == "overrides").metadata["help"]
    p = argparse.ArgumentParser(prog="fedllm-eval merge", description="Merge a LoRA checkpoint into its base model.")
    p.add_argument("checkpoint", help="checkpoints/round-N folder (a PEFT adapter)")
    p.add_argument("out", help="folder for the merged model")
    p.add_argument("--override", "--overrides", dest="overrides", action="append", default=[], help=overrides_help)
    args = p.parse_args(argv)
    setup_console()
    log.info("merged model written to %s", merge(args.checkpoint, args.out, args.overrides))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fedllm-eval``: a bad input ends with a one-line message and exit status 1 (2 for flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            merge_main(argv[1:])
            return
        checkpoint, settings = parse_eval_args(argv)
        setup_console(progress=settings.progress)
        evaluate_checkpoint(checkpoint, settings)
    except (ConfigError, DataSourceError, JudgeError) as err:
        raise SystemExit(f"fedllm-eval: {err}") from None


def merge_entry() -> None:
    """Entry point of ``fedllm-merge``."""
    main(["merge", *sys.argv[1:]])

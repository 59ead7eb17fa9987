import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from evaluation.cli import eval_parser, main, parse_eval_args
from evaluation.judge import JudgeConfig
from evaluation.runner import EvalSettings
from fedllm_app.config import ConfigError

REPO = Path(__file__).resolve().parents[3]
JUDGE = ["--judge-base-url", "http://judge/v1", "--judge-model", "m"]
# A value unlike every default, per field type; the flag gets its text form.
OTHER_VALUE = {int: 3, float: 0.25, str: "x", bool: False}


@pytest.fixture(autouse=True)
def console_restored():
    """main() gives the ``fedllm`` logger a console handler and stops propagation; later tests read it via caplog."""
    logger = logging.getLogger("fedllm")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level


def settings_fields():
    """(flag name, field, type, read the parsed value) for every EvalSettings field and every judge field."""
    for f in fields(EvalSettings):
        if f.name != "judge":
            yield f.name, f, get_type_hints(EvalSettings)[f.name], lambda s, n=f.name: getattr(s, n)
    for f in fields(JudgeConfig):
        yield f"judge_{f.name}", f, get_type_hints(JudgeConfig)[f.name], lambda s, n=f.name: getattr(s.judge, n)


def test_a_checkpoint_alone_runs_with_the_dataclass_defaults():
    assert parse_eval_args(["ckpt"]) == ("ckpt", EvalSettings())
    assert parse_eval_args(["ckpt", *JUDGE])[1].judge == JudgeConfig("http://judge/v1", "m")


def test_every_settings_field_is_a_flag_with_its_default_and_help():
    actions = {}
    for action in eval_parser()._actions:
        actions.setdefault(action.dest, action)  # the first one sets the default (--progress before --no-progress)
    for name, f, hint, read in settings_fields():
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        assert actions[name].default == (None if default is MISSING else default), name
        assert actions[name].help == f.metadata["help"], name
        item = next((t for t in (hint, *get_args(hint)) if t in OTHER_VALUE), str)
        value = OTHER_VALUE[item]
        settings = parse_eval_args(["ckpt", *JUDGE, f"--{name.replace('_', '-')}", str(value)])[1]
        assert read(settings) == ([value] if f.default_factory is list else value), name


def test_the_flag_names_of_the_earlier_parser_still_work():
    argv = ["ckpt", "--bench", "math", "--data-dir", "d", "--limit", "5", "--batch-size", "2", "--seed", "1"]
    argv += ["--shots", "5", "--max-new-tokens", "9", "--code-samples", "4", "--code-temperature", "0.5"]
    argv += ["--code-timeout", "3", "--threads", "2", "--no-progress", "--override", "a=1", "--override", "b=2"]
    argv += [*JUDGE, "--judge-key-env", "KEY", "--judge-cache", "/c", "--judge-workers", "2"]
    checkpoint, s = parse_eval_args(argv)
    assert checkpoint == "ckpt" and (s.bench, s.data_dir, s.limit, s.batch_size, s.seed) == ("math", "d", 5, 2, 1)
    assert (s.shots, s.max_new_tokens, s.code_samples, s.code_temperature, s.code_timeout) == (5, 9, 4, 0.5, 3.0)
    assert s.threads == 2 and s.progress is False and s.overrides == ["a=1", "b=2"]
    assert s.judge == JudgeConfig("http://judge/v1", "m", "KEY", "/c", workers=2)


def test_every_flag_the_readme_shows_for_fedllm_eval_exists():
    section = (REPO / "README.md").read_text().split("## Evaluation: `fedllm-eval`")[1].split("\n## ")[0]
    section = re.sub(r"```bash.*?```", "", section, flags=re.S)  # the flwr commands of "During training"
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*[a-z])(?![\w*-])", section))
    assert {"--config", "--override", "--judge-key-env", "--judge-cache"} <= shown
    assert shown <= set(eval_parser()._option_string_actions)


def test_a_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("bench: math\nlimit: 5\nmax-new-tokens: 64\nprogress: false\noverrides: [a=1]\n")
    _, s = parse_eval_args(["ckpt", "--config", str(config), "--limit", "7", "--override", "b=2"])
    assert (s.bench, s.limit, s.max_new_tokens, s.progress, s.overrides) == ("math", 7, 64, False, ["a=1", "b=2"])
    (tmp_path / "eval.json").write_text(json.dumps({"judge_base_url": "http://judge/v1", "judge_model": "m"}))
    assert parse_eval_args(["ckpt", "--config", str(tmp_path / "eval.json")])[1].judge.model == "m"
    config.write_text("max_new_token: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'max_new_token'; did you mean 'max_new_tokens'"):
        parse_eval_args(["ckpt", "--config", str(config)])
    config.write_text("bench: [math, code]\n")
    with pytest.raises(ConfigError, match="'bench' takes one value, not a list"):
        parse_eval_args(["ckpt", "--config", str(config)])
    with pytest.raises(ConfigError, match="'nope.yaml' is not a file"):
        parse_eval_args(["ckpt", "--config", "nope.yaml"])


def test_bad_inputs_exit_with_a_one_line_message(tmp_path, checkpoint):
    def exit_message(*argv):
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        assert isinstance(exited.value.code, str) and "\n" not in exited.value.code
        return exited.value.code

    assert exit_message(str(checkpoint), "--bench", "fnance").startswith("fedllm-eval: unknown benchmark 'fnance'")
    assert "is not a folder" in exit_message(str(tmp_path / "nope"), "--bench", "finance")
    assert "no local data for benchmark 'fpb'" in exit_message(
        str(checkpoint), "--bench", "fpb", "--data-dir", str(tmp_path)
    )
    assert "both --judge-base-url and --judge-model" in exit_message(str(checkpoint), "--judge-model", "m")
    assert "unknown key 'bnch'" in exit_message(str(checkpoint), "--config", str(_write(tmp_path, "bnch: x")))
    assert "only a PEFT adapter can be merged" in exit_message("merge", str(tmp_path), str(tmp_path / "out"))


def _write(folder: Path, text: str) -> Path:
    (folder / "eval.yaml").write_text(text)
    return folder / "eval.yaml"


def test_the_command_fails_with_status_1_and_no_traceback(tmp_path):
    done = run_cli(str(tmp_path), "--judge-base-url", "http://judge/v1", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "fedllm-eval: give both --judge-base-url and --judge-model to grade MT-Bench and Vicuna (or neither to only "
        "save their answers)"
    ]


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``fedllm-eval ARGV`` as its console script runs it, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from evaluation.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_every_benchmark_on_the_fixtures_writes_json_and_markdown(checkpoint, fixtures_dir, capsys):
    args = ["--bench", "all", "--data-dir", str(fixtures_dir), "--max-new-tokens", "24", "--shots", "1"]
    main([str(checkpoint), *args, "--no-progress"])
    report = json.loads((checkpoint / "eval" / "all.json").read_text())
    results = report["benchmarks"]
    from evaluation.runner import BENCHMARKS

    assert list(results) == list(BENCHMARKS)
    for name, metrics in results.items():
        assert metrics["n"] >= 2 and metrics["seconds"] >= 0, name
        for key, value in metrics.items():
            if key.startswith(("accuracy", "f1", "pass@", "refusal", "attack")):
                assert 0.0 <= value <= 1.0, (name, key)
    assert results["mmlu"]["shots"] == 1 and results["medqa"]["shots"] == 0  # few-shot is MMLU's
    assert results["heldout"]["eval_loss"] > 0 and results["heldout"]["perplexity"] > 1
    assert results["mt_bench"]["judged"] == 0 and "judge" in results["mt_bench"]["note"]
    gsm8k = results["gsm8k"]
    assert gsm8k["data"]["kind"] == "local file" and gsm8k["data"]["location"] == str(fixtures_dir / "gsm8k.jsonl")
    assert (
        gsm8k["data"]["shaped_like"] == "openai/gsm8k (main), split test"
        and "strict-match" in gsm8k["protocol"]["reference"]
    )
    assert all(metrics["protocol"]["reference"] and metrics["protocol"]["version"] for metrics in results.values())
    assert "lm-evaluation-harness" in results["mmlu"]["protocol"]["reference"]
    saved = [json.loads(x) for x in (checkpoint / "eval" / "gsm8k_generations.jsonl").read_text().splitlines()]
    assert len(saved) == 2 and "Ana has 3 boxes" in saved[0]["prompt"] and isinstance(saved[0]["output"], str)
    md = (checkpoint / "eval" / "all.md").read_text()
    assert (
        "| tfns | f1_macro |" in md
        and "| humaneval | pass@1 |" in md
        and "gsm8k: EleutherAI lm-evaluation-harness" in md
        and f"rows from local file {fixtures_dir}" in md
    )
    out = capsys.readouterr().out
    assert all(f"[fedllm] {name}: " in out for name in BENCHMARKS) and "[fedllm] wrote " in out


@pytest.mark.slow
def test_the_command_evaluates_from_a_config_file_and_merges(checkpoint, fixtures_dir, tmp_path, capsys):
    config = _write(tmp_path, f"bench: safety\ndata_dir: {fixtures_dir}\nmax_new_tokens: 8\nprogress: false\n")
    done = run_cli(str(checkpoint), "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[fedllm] advbench: harmless_rate_openfedllm " in done.stdout and "safety.json" in done.stdout
    assert "advbench" in json.loads((checkpoint / "eval" / "safety.json").read_text())["benchmarks"]
    main(["merge", str(checkpoint), str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert f"[fedllm] merged model written to {tmp_path / 'merged'}" in capsys.readouterr().out

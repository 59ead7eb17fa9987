import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.cli import eval_parser, main, settings_from_args

REPO = Path(__file__).resolve().parents[3]


def test_flags_build_the_settings():
    a = eval_parser().parse_args(
        ["ckpt", "--bench", "math", "--judge-base-url", "http://x/v1", "--judge-model", "m", "--override", "a=1"]
    )
    s = settings_from_args(a)
    assert s.bench == "math" and s.judge.base_url == "http://x/v1" and s.judge.model == "m" and s.overrides == ["a=1"]
    with pytest.raises(SystemExit, match="both --judge-base-url and --judge-model"):
        settings_from_args(eval_parser().parse_args(["ckpt", "--judge-model", "m"]))


def test_bad_inputs_exit_with_a_message(tmp_path, checkpoint):
    with pytest.raises(SystemExit, match="unknown benchmark 'fnance'"):
        main([str(checkpoint), "--bench", "fnance"])
    with pytest.raises(SystemExit, match="is not a folder"):
        main([str(tmp_path / "nope"), "--bench", "finance"])
    with pytest.raises(SystemExit, match=r"no local data for benchmark 'fpb'"):
        main([str(checkpoint), "--bench", "fpb", "--data-dir", str(tmp_path)])


@pytest.mark.slow
def test_every_benchmark_on_the_fixtures_writes_json_and_markdown(checkpoint, fixtures_dir):
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
    assert report["sources"]["gsm8k"] == "openai/gsm8k (main), split test"
    saved = [json.loads(x) for x in (checkpoint / "eval" / "gsm8k_generations.jsonl").read_text().splitlines()]
    assert len(saved) == 2 and "Ana has 3 boxes" in saved[0]["prompt"] and isinstance(saved[0]["output"], str)
    md = (checkpoint / "eval" / "all.md").read_text()
    assert "| tfns | f1_macro |" in md and "| humaneval | pass@1 |" in md and "shaped like openai/gsm8k" in md


@pytest.mark.slow
def test_hydra_module_and_merge_command(checkpoint, fixtures_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "evaluation", f"checkpoint={checkpoint}", "bench=safety", f"data_dir={fixtures_dir}"]
    done = subprocess.run([*cmd, "max_new_tokens=8", "progress=false"], cwd=tmp_path, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "advbench" in json.loads((checkpoint / "eval" / "safety.json").read_text())["benchmarks"]
    assert list(tmp_path.iterdir()) == []  # Hydra leaves no outputs/ or log file behind
    main(["merge", str(checkpoint), str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()

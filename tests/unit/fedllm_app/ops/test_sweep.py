import json

from fedllm_app.ops.sweep import job_name, write_comparison


def test_job_names_are_valid_run_names():
    assert job_name(["strategy=fedprox", "strategy.mu=0.1"]) == "fedprox_mu-0.1"
    assert job_name(["strategy=fedavg", "output_dir=/x"]) == "fedavg"
    assert job_name([]) == "default"
    assert "=" not in job_name(["seed=7", "training.learning_rate=1e-3"])


def _run(root, name, strategy, acc, rounds):
    d = root / "runs" / name
    d.mkdir(parents=True)
    final = {"accuracy": acc, "accuracy/a": acc, "eval_loss": 1.0}
    (d / "summary.json").write_text(json.dumps({"strategy": strategy, "final": final, "total_seconds": 3.0}))
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, **({"accuracy": acc} if rounds else {})}) + "\n" for r in (1, 2))
    )


def test_comparison_table_csv_and_plot_from_finished_runs(tmp_path):
    _run(tmp_path, "fedavg", "fedavg", 0.5, True)
    _run(tmp_path, "local", "local", 0.3, False)
    write_comparison(tmp_path)
    md = (tmp_path / "comparison.md").read_text()
    assert "| fedavg | fedavg | 0.500 | 0.500 | 1.000 | +0.200 |" in md
    assert (tmp_path / "comparison.csv").read_text().count("\n") == 3
    assert (tmp_path / "comparison.png").stat().st_size > 1000

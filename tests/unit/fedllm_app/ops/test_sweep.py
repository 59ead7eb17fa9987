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


def test_without_a_local_baseline_the_table_has_no_gap_column_and_no_nan(tmp_path):
    _run(tmp_path, "fedavg", "fedavg", 0.5, True)
    _run(tmp_path, "fedprox", "fedprox", 0.25, True)
    write_comparison(tmp_path)
    md = (tmp_path / "comparison.md").read_text()
    assert "vs local-only mean" not in md and "nan" not in md
    assert "| fedprox | fedprox | 0.250 | 0.250 | 1.000 | 3 |" in md


def test_a_metric_a_run_lacks_reads_n_a(tmp_path):
    _run(tmp_path, "fedavg", "fedavg", 0.5, True)
    d = tmp_path / "runs" / "dpo"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"strategy": "fedavg", "final": {"accuracy": 0.7}}))
    (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.7}) + "\n")
    write_comparison(tmp_path)
    assert "| dpo | fedavg | 0.700 | n/a | n/a | n/a |" in (tmp_path / "comparison.md").read_text()


def test_the_plot_labels_whole_rounds_only(tmp_path):
    from fedllm_app.ops.sweep import accuracy_figure, collect

    _run(tmp_path, "fedavg", "fedavg", 0.5, True)
    ax = accuracy_figure(collect(tmp_path)).axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks

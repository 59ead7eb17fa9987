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


def _seeded(root, name, strategy, acc, seed, setting):
    _run(root, name, strategy, acc, True)
    summary = json.loads((root / "runs" / name / "summary.json").read_text())
    summary.update(bytes_sent_total=2_000_000, bytes_received_total=1_000_000)
    (root / "runs" / name / "summary.json").write_text(json.dumps(summary))
    (root / "runs" / f"{name}.overrides.json").write_text(json.dumps([*setting, f"seed={seed}"]))


def test_a_seed_sweep_gives_each_setting_its_mean_and_sample_sd_over_seeds(tmp_path):
    for seed, acc in enumerate([0.5, 0.7, 0.6]):
        _seeded(tmp_path, f"fedavg_{seed}", "fedavg", acc, seed, ["strategy=fedavg"])
    for seed, acc in enumerate([0.2, 0.4]):
        _seeded(tmp_path, f"local_{seed}", "local", acc, seed, ["strategy=local"])
    write_comparison(tmp_path)
    md = (tmp_path / "comparison_seeds.md").read_text()
    # fedavg: mean 0.6, sample sd 0.1; local mean 0.3 -> +0.300; 3 MB both ways
    assert "| fedavg | fedavg | 3 | 0.600 | 0.100 | 0.500 0.700 0.600 | 1.000 | +0.300 | 3.00 | 3 |" in md
    assert "| local | local | 2 | 0.300 | 0.141 | 0.200 0.400 | 1.000 | +0.000 | 3.00 | 3 |" in md


def test_seed_groups_fall_back_to_hydras_saved_overrides(tmp_path):
    from fedllm_app.ops.sweep import collect, job_overrides, seed_groups

    for seed in (0, 1):
        overrides = ["num_rounds=30", "strategy=fedavg", f"seed={seed}", "comm.codec=nf4"]
        name = job_name(overrides)
        _run(tmp_path, name, "fedavg", 0.5, True)
        hydra_dir = tmp_path / str(seed) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    groups = seed_groups(collect(tmp_path), job_overrides(tmp_path))
    assert list(groups) == ["30_fedavg_codec-nf4"] and len(groups["30_fedavg_codec-nf4"]) == 2


def test_a_sweep_without_repeated_seeds_writes_no_seed_table(tmp_path):
    _seeded(tmp_path, "fedavg_0", "fedavg", 0.5, 0, ["strategy=fedavg"])
    _seeded(tmp_path, "fedprox_0", "fedprox", 0.5, 0, ["strategy=fedprox"])
    write_comparison(tmp_path)
    assert not (tmp_path / "comparison_seeds.md").exists()

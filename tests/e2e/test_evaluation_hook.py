"""The server's per-round benchmark hook (eval.benches) through a real Flower simulation."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evaluation"


@pytest.mark.slow
@pytest.mark.integration
def test_benchmarks_land_in_metrics_jsonl_through_flower(flower, tmp_path):
    out = tmp_path / "outputs"
    overrides = (
        "num_rounds=2 num_clients=2 sample_clients=2 training.max_steps=1 baseline=none dataset.test_per_domain=2 "
        f"eval.benches=[tfns] eval.every=2 eval.data_dir={FIXTURES} output_dir={out} run_name=bench"
    )
    status, log = flower.run(overrides, num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    lines = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    assert "bench/tfns/accuracy" not in lines[0]
    assert 0 <= lines[1]["bench/tfns/accuracy"] <= 1 and lines[1]["bench/tfns/f1_macro"] >= 0
    assert (out / "bench" / "eval" / "round-2.md").is_file()

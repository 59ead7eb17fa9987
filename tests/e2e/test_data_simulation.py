"""End to end through `flwr run`: a Hub-shaped local file of the catalogue, and federated DPO."""

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "datasets"


def rounds(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_alpaca_gpt4_from_a_local_hub_shaped_file(flower, tmp_path):
    out = tmp_path / "outputs"
    overrides = (
        f"dataset=alpaca_gpt4 dataset.path={FIXTURES / 'alpaca_gpt4.jsonl'} dataset.heldout=2 "
        f"num_rounds=2 num_clients=2 sample_clients=2 training.max_steps=1 training.batch_size=2 baseline=none "
        f"output_dir={out} run_name=alpaca"
    )
    status, log = flower.run(overrides, num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    assert "alpaca_gpt4.jsonl': 8 rows read, 8 kept" in log
    assert "[fedllm] client 0: 3 rows, domain mix {'alpaca_gpt4': 3}" in log
    lines = rounds(out / "alpaca" / "metrics.jsonl")
    assert [(r["round"], r["replied"]) for r in lines] == [(1, 2), (2, 2)]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["eval_loss"]) for r in lines)


def test_federated_dpo_reports_preference_metrics_every_round(flower, tmp_path):
    out = tmp_path / "outputs"
    overrides = (
        "task=dpo strategy=fedprox num_rounds=2 num_clients=2 sample_clients=2 training.max_steps=2 "
        "training.batch_size=8 dataset.train_per_domain=40 dataset.test_per_domain=5 baseline=none "
        f"output_dir={out} run_name=dpo"
    )
    status, log = flower.run(overrides, num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    lines = rounds(out / "dpo" / "metrics.jsonl")
    assert [(r["round"], r["replied"]) for r in lines] == [(1, 2), (2, 2)]
    assert f"acc {lines[-1]['accuracy']:.3f} margin {lines[-1]['reward_margin']:.3f}" in log
    for r in lines:
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["dpo_loss"]) and np.isfinite(r["reward_margin"])
        assert 0 <= r["preference_accuracy"] <= 1
    summary = json.loads((out / "dpo" / "summary.json").read_text())
    assert summary["initial"]["reward_margin"] == 0 and lines[-1]["reward_margin"] != 0
    assert (out / "dpo" / "checkpoints" / "round-2" / "adapter_model.safetensors").is_file()

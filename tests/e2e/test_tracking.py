"""End to end through Flower: the ServerApp reports every round to TensorBoard and writes the model card."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_a_two_round_simulation_puts_one_point_per_round_in_tensorboard_and_a_card_by_the_adapter(flower, tmp_path):
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "outputs"
    overrides = (
        "num_rounds=2 num_clients=2 sample_clients=2 training.max_steps=2 baseline=none dataset.test_per_domain=2 "
        f"logging.report_to=[tensorboard] output_dir={out} run_name=tracked"
    )
    status, log = flower.run(overrides, num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    run = out / "tracked"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("train_loss", "accuracy", "eval_loss", "bytes_sent_total"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert len(events.Scalars("train_loss")) == 2
    assert f"[fedllm] trackers: tensorboard in {run}" in log

    card = ModelCard.load(run / "checkpoints" / "round-2" / "README.md")
    assert {"federated-learning", "flower", "lora", "fedavg"} <= set(card.data.tags)
    line = next(x for x in card.text.splitlines() if x.startswith("| accuracy |"))
    _, before, final = (cell.strip() for cell in line.strip("|").split("|"))
    assert float(final) == pytest.approx(rows[-1]["accuracy"], abs=5e-5) and before

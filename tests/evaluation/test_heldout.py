import pytest

from evaluation.heldout import evaluate_adapter, exact_match
from fedllm_app.config import load_config
from fedllm_app.data import heldout
from fedllm_app.model import get_model

pytestmark = pytest.mark.slow


def test_metrics_are_in_range_and_per_domain():
    cfg = load_config({"overrides": "dataset.test_per_domain=5"})
    model, tok = get_model(cfg.model, cfg.seed)
    metrics = evaluate_adapter(model, tok, heldout(cfg), cfg.training)
    assert metrics["eval_loss"] > 0
    assert set(metrics) >= {"accuracy", "accuracy/reverse", "accuracy/sentiment", "accuracy/arithmetic", "accuracy/units"}
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith("accuracy"))


def test_exact_match_scores_a_known_answer():
    cfg = load_config({})
    model, tok = get_model(cfg.model, cfg.seed)
    # The pre-trained base copies words: "Repeat the words" is in its pre-training form.
    rows = [{"instruction": "Repeat the words: red fox", "response": "red fox", "domain": "copy"},
            {"instruction": "Repeat the words: red fox", "response": "blue cat", "domain": "wrong"}]
    scores = exact_match(model, tok, rows, "chat", batch_size=2, max_new_tokens=12)
    assert scores["accuracy/copy"] == 1.0 and scores["accuracy/wrong"] == 0.0

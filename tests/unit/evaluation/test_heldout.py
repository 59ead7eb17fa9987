import pytest

from evaluation.heldout import evaluate_adapter, exact_match, generate
from fedllm_app.config import load_config
from fedllm_app.data.pipeline import heldout
from fedllm_app.data.templates import prompt_text
from fedllm_app.model import get_model

pytestmark = pytest.mark.slow


def test_metrics_are_in_range_and_per_domain():
    cfg = load_config({"overrides": "dataset.test_per_domain=5"})
    model, tok = get_model(cfg.model, cfg.seed)
    metrics = evaluate_adapter(model, tok, heldout(cfg), cfg.training)
    assert metrics["eval_loss"] > 0
    assert set(metrics) >= {
        "accuracy",
        "accuracy/reverse",
        "accuracy/sentiment",
        "accuracy/arithmetic",
        "accuracy/units",
    }
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith("accuracy"))


def test_exact_match_scores_a_known_answer():
    cfg = load_config({})
    model, tok = get_model(cfg.model, cfg.seed)
    prompt = prompt_text("Repeat the words: red fox", "chat", tok)
    said = generate(model, tok, [prompt], batch_size=1, max_new_tokens=12)[0]
    assert said.strip(), "the greedy answer should not be empty"
    rows = [
        {"instruction": "Repeat the words: red fox", "response": said.strip(), "domain": "copy"},
        {"instruction": "Repeat the words: red fox", "response": said.strip() + "x", "domain": "wrong"},
    ]
    # Padding to a longer neighbour (left padding) must not change the greedy answer.
    rows.append({"instruction": "Repeat the words: red fox blue moon cold sun", "response": "?", "domain": "pad"})
    scores = exact_match(model, tok, rows, "chat", batch_size=3, max_new_tokens=12)
    assert scores["accuracy/copy"] == 1.0 and scores["accuracy/wrong"] == 0.0


def test_a_round_without_exact_match_has_the_same_loss_and_no_generation():
    cfg = load_config({"overrides": "dataset.test_per_domain=2"})
    model, tok = get_model(cfg.model, cfg.seed)
    full = evaluate_adapter(model, tok, heldout(cfg), cfg.training)
    loss_only = evaluate_adapter(model, tok, heldout(cfg), cfg.training, exact=False)
    assert loss_only == {"eval_loss": full["eval_loss"]}

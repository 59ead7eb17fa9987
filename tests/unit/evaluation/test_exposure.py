"""Canary exposure: the rank/exposure math on hand-computed numbers, the estimate, and the tiny model's scores."""

import math

import numpy as np
import pytest

from evaluation.exposure import (
    ExposureSettings,
    SecretLayout,
    choose_method,
    digit_tree_scores,
    estimated_exposure,
    exposure_from_rank,
    exposure_report,
    rank_of,
    secret_layout,
    sequence_scores,
)
from fedllm_app.data.canaries import Canary, CanarySpec, make_canaries


def test_rank_counts_the_candidates_at_most_as_perplexed_ties_ahead():
    logppl = np.array([3.0, 1.0, 2.0, 1.0, 5.0])
    assert rank_of(logppl, 1) == 2  # itself and the tie at index 3
    assert rank_of(logppl, 3) == 2
    assert rank_of(logppl, 2) == 3  # 1.0, 1.0, 2.0
    assert rank_of(logppl, 4) == 5
    assert rank_of(np.full(8, 0.7), 5) == 8  # a model that cannot tell them apart: last


def test_exposure_is_log2_space_minus_log2_rank():
    assert exposure_from_rank(1, 1024) == 10.0
    assert exposure_from_rank(2, 8) == 2.0
    assert exposure_from_rank(8, 8) == 0.0
    assert exposure_from_rank(3, 10**6) == pytest.approx(math.log2(10**6) - math.log2(3))
    for bad in (0, 9):
        with pytest.raises(ValueError, match=f"rank {bad} must lie in 1..8"):
            exposure_from_rank(bad, 8)


def test_the_estimate_follows_the_fitted_distributions_tail():
    sample = np.random.default_rng(0).normal(10.0, 2.0, 4000)
    assert estimated_exposure(10.0, sample, 10**6) == pytest.approx(1.0, abs=0.05)  # the median: half below
    assert estimated_exposure(4.0, sample, 10**6) == pytest.approx(-math.log2(0.0013499), abs=0.3)  # 3 sd below
    assert estimated_exposure(-100.0, sample, 10**6) == pytest.approx(math.log2(10**6))  # clipped to log2 |R|
    assert estimated_exposure(30.0, sample, 10**6) == pytest.approx(0.0, abs=1e-6)
    assert estimated_exposure(1.0, np.full(50, 1.0), 10**6) == 0.0


def test_the_estimate_agrees_with_the_exact_rank_on_a_skewed_space():
    """Log-perplexities over a randomness space look skew-normal (Carlini et al., figure 5); here they are."""
    from scipy.stats import skewnorm

    space = skewnorm.rvs(4.0, loc=20.0, scale=5.0, size=10**5, random_state=1)  # every candidate's log-perplexity
    canary = int(np.argsort(space)[9])  # the 10th most likely
    exact = exposure_from_rank(rank_of(space, canary), space.size)
    sample = np.random.default_rng(2).choice(space, 5000)
    assert exact == pytest.approx(math.log2(10**4))
    assert estimated_exposure(space[canary], sample, space.size) == pytest.approx(exact, abs=1.0)


def test_exact_needs_one_token_per_digit_and_auto_falls_back_to_the_estimate():
    merged = SecretLayout(context=(1, 2), suffix=(3,), digit_ids=None)
    per_digit = SecretLayout(context=(1, 2), suffix=(3,), digit_ids=tuple(range(10, 20)))
    with pytest.raises(ValueError, match="privacy.canaries.method=estimate"):
        choose_method(ExposureSettings(method="exact"), merged, 3)
    assert choose_method(ExposureSettings(), merged, 3) == "estimate"
    assert choose_method(ExposureSettings(), per_digit, 6) == "exact"
    assert choose_method(ExposureSettings(), per_digit, 7) == "estimate"
    with pytest.raises(ValueError, match="method='rank' must be one of auto, exact, estimate"):
        ExposureSettings(method="rank")


# The tests below load the tiny model: slow, as the project marks every test that loads a model.


@pytest.fixture(scope="module")
def tiny():
    from fedllm_app.config import load_config
    from fedllm_app.model import get_model

    cfg = load_config({})
    model, tokenizer = get_model(cfg.model, cfg.seed)
    return model, tokenizer


@pytest.mark.slow
def test_the_digit_tree_gives_the_log_probs_of_scoring_whole_sequences(tiny):
    model, tok = tiny
    canary = Canary(1, "407")
    layout = secret_layout(tok, canary, "chat", 3)
    assert layout.digit_ids == tuple(tok.convert_tokens_to_ids(list("0123456789")))
    assert tok.decode(list(layout.context)).endswith("<|assistant|>my code is ")
    tree = digit_tree_scores(model, layout.context, layout.digit_ids, 3, batch_size=37)
    assert tree.shape == (1000,) and np.all(tree < 0)
    candidates = ["407", "000", "999", "123", "980"]
    whole = sequence_scores(model, layout.context, [[layout.digit_ids[int(d)] for d in c] for c in candidates], 2)
    np.testing.assert_allclose(tree[[int(c) for c in candidates]], whole, rtol=0, atol=1e-4)
    assert np.exp(tree).sum() <= 1.0 + 1e-6  # the secrets' probabilities (other continuations take the rest)


@pytest.mark.slow
def test_the_whole_sequence_scores_are_the_tokens_training_sees(tiny):
    """The estimate's scorer reads the secret's tokens out of TRL's tokenisation of the canary row."""
    model, tok = tiny
    canary = Canary(2, "58")
    layout = secret_layout(tok, canary, "chat", 2)
    from evaluation.exposure import full_ids

    full = full_ids(tok, canary, "58", "chat")
    assert layout.target(full, "58") == [layout.digit_ids[5], layout.digit_ids[8]]
    tree = digit_tree_scores(model, layout.context, layout.digit_ids, 2, batch_size=100)
    whole = sequence_scores(model, layout.context, [layout.target(full, "58")], 1)[0]
    assert whole == pytest.approx(tree[58], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chat", "alpaca", "vicuna"])
def test_candidates_tokenised_in_one_batch_are_the_tokens_trl_makes(tiny, template):
    from evaluation.exposure import candidate_ids, full_ids

    _, tok = tiny
    canary = Canary(3, "4071")
    secrets = ["0000", "4071", "9999", "1234", "0407"]
    assert candidate_ids(tok, canary, secrets, template) == [full_ids(tok, canary, s, template) for s in secrets]


@pytest.mark.slow
def test_a_report_holds_each_canary_and_stays_within_log2_space(tiny):
    model, tok = tiny
    canaries = make_canaries(CanarySpec(count=2, digits=3, seed=5))
    exact = exposure_report(model, tok, canaries, 3, "chat", ExposureSettings(batch_size=200))
    estimate = exposure_report(model, tok, canaries, 3, "chat", ExposureSettings(method="estimate", sample=100))
    for report, method in ((exact, "exact"), (estimate, "estimate")):
        assert report["log2_space"] == pytest.approx(math.log2(1000)) and report["digits"] == 3
        assert [c["number"] for c in report["canaries"]] == [1, 2]
        assert all(c["method"] == method and 0 <= c["exposure"] <= report["log2_space"] for c in report["canaries"])
        assert report["max"] == max(c["exposure"] for c in report["canaries"])
    assert all(1 <= c["rank"] <= 1000 for c in exact["canaries"])
    # both methods score the same tokens: the same log-perplexity of each canary
    for a, b in zip(exact["canaries"], estimate["canaries"], strict=True):
        assert a["log_perplexity"] == pytest.approx(b["log_perplexity"], abs=1e-4)


@pytest.mark.slow
def test_the_server_knows_the_method_before_the_run(tiny):
    from evaluation.exposure import check_method
    from fedllm_app.config import load_config

    _, tok = tiny
    on = "privacy.canaries.count=2 privacy.canaries.digits"
    assert check_method(tok, load_config({"overrides": f"{on}=6"})) == "exact"
    assert check_method(tok, load_config({"overrides": f"{on}=7"})) == "estimate"
    assert check_method(tok, load_config({"overrides": f"{on}=3 privacy.canaries.method=estimate"})) == "estimate"

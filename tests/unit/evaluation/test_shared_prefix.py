"""Continuations scored after one cached pass over their shared prefix equal scoring each whole sequence.

The reference is :func:`evaluation.generation.sequence_logps` (itself checked against the full logits in
test_scored_positions.py) on prefix + continuation. Random tiny models, built offline; prefixes of different
lengths in one batch (left padding), continuations of different lengths, one of them empty.
"""

import pytest
import torch

from evaluation.generation import sequence_logps
from evaluation.shared_prefix import SharedPrefixUnsupported, shared_prefix_logps
from tests.unit.evaluation.test_scored_positions import tiny_llama


def items(seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    # prompts of 11, 3, 1 and 7 tokens; chosen and rejected of different lengths, one empty, one of 1 token
    return [(ids(11), [ids(4), ids(6)]), (ids(3), [ids(1), ids(5)]), (ids(1), [ids(7), []]), (ids(7), [ids(2), ids(2)])]


def expected(model, data):
    return [sequence_logps(model, 0, [(p, c) for c in conts], batch_size=1) for p, conts in data]


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_continuations_after_a_cached_prefix_score_as_the_whole_sequences_do(batch_size):
    model = tiny_llama()
    data = items()
    got = shared_prefix_logps(model, 0, data, batch_size)
    assert_same(got, expected(model, data))
    assert got[2][1] == 0.0  # an empty continuation scores nothing
    assert all(x < 0 for row in got for x in row if x != 0.0)


def test_the_prefix_runs_once_for_both_continuations():
    model = tiny_llama()
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))
    shared_prefix_logps(model, 0, items(), batch_size=4)
    # one pass of the 4 prefixes (11 columns, left-padded), one of the 8 continuations (7 columns) after them
    assert seen == [(4, 11), (8, 7)]


def test_a_peft_wrapped_model_and_a_soft_capped_gemma2_score_as_their_whole_sequences_do():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    peft = get_peft_model(tiny_llama(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, final_logit_softcapping=0.5,
    )).eval()  # fmt: skip
    with torch.no_grad():
        gemma.lm_head.weight.mul_(100)
    for model in (peft, gemma):
        data = items(2)
        assert_same(shared_prefix_logps(model, 0, data, batch_size=4), expected(model, data))


def test_a_model_without_a_repeatable_cache_is_refused_not_misread():
    model = tiny_llama()
    forward = model.forward
    model.forward = lambda **kw: forward(**{**kw, "use_cache": False})  # returns no cache
    with pytest.raises(SharedPrefixUnsupported, match="no key/value cache"):
        shared_prefix_logps(model, 0, items(), batch_size=4)


def test_empty_prefixes_and_ragged_continuation_counts_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="non-empty prefixes"):
        shared_prefix_logps(model, 0, [([], [[1, 2], [3]])], batch_size=1)
    with pytest.raises(ValueError, match="same number of continuations"):
        shared_prefix_logps(model, 0, [([1], [[1, 2], [3]]), ([1], [[2]])], batch_size=2)


def scorer_on_the_builtin_model(monkeypatch=None, shift=0.0):
    """HeldoutPreferences on the built-in model's held-out pairs; ``shift`` moves the shared path's values."""
    import evaluation.preferences as preferences_module
    from fedllm_app.config import load_config
    from fedllm_app.data.pipeline import heldout
    from fedllm_app.model import get_adapter, get_model, set_adapter

    if shift:
        real = preferences_module.shared_prefix_logps
        monkeypatch.setattr(preferences_module, "shared_prefix_logps",
                            lambda *a: [[x + shift for x in row] for row in real(*a)])  # fmt: skip
    cfg = load_config({"overrides": "task=dpo dataset.test_per_domain=2"})
    model, tok = get_model(cfg.model, cfg.seed)
    before = get_adapter(model)  # the process's cached model: its adapter goes back for the tests after this one
    try:
        scorer = preferences_module.HeldoutPreferences(model, tok, heldout(cfg), cfg)
        whole = preferences_module.ids_logps(model, scorer.pad, scorer.ids, scorer.t)
        metrics = scorer.evaluate(model)
    finally:
        set_adapter(model, before)
    return scorer, whole, metrics


def test_the_servers_dpo_evaluation_scores_each_prompt_once_with_the_whole_sequences_values():
    scorer, whole, metrics = scorer_on_the_builtin_model()
    assert scorer.shared
    for got, want in zip(scorer.reference, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert metrics["reward_margin"] == 0.0 and metrics["preference_accuracy"] == 0.0  # still the reference


@pytest.mark.parametrize("shift", [0.05, float("nan")])
def test_a_model_on_which_the_two_ways_disagree_is_scored_whole_and_the_log_says_so(monkeypatch, caplog, shift):
    scorer, whole, metrics = scorer_on_the_builtin_model(monkeypatch, shift=shift)
    assert not scorer.shared
    assert "each sequence is scored whole" in caplog.text
    for got, want in zip(scorer.reference, whole, strict=True):
        torch.testing.assert_close(got, want)
    assert metrics["reward_margin"] == 0.0

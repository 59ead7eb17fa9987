"""Held-out scoring runs the LM head only where a scored token is predicted, with the same log-probabilities.

The reference is the plain computation: the model's full logits, ``log_softmax`` over the vocabulary, the
token's entry. Random tiny models, built offline.
"""

import pytest
import torch

from evaluation.generation import right_padded, sequence_logps, token_logps
from evaluation.heldout import token_loss


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def reference_logps(model, ids, mask, rows, cols):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits[rows, cols - 1], dim=-1).gather(-1, ids[rows, cols].unsqueeze(-1)).squeeze(-1)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (9, 5, 12)]
    ids, mask = right_padded(seqs, 0)
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([3, 8, 4, 1, 7, 11])
    return seqs, ids, mask, rows, cols


def test_the_head_sees_only_the_predicting_positions_and_the_log_probabilities_match_the_full_logits():
    model = tiny_llama()
    _, ids, mask, rows, cols = batch()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    got = token_logps(model, ids, mask, rows, cols)
    assert seen == [(1, 6, 32)], "the head should run on the 6 scored positions only"
    torch.testing.assert_close(got, reference_logps(model, ids, mask, rows, cols), rtol=1e-5, atol=1e-5)


def test_a_model_that_caps_its_logits_after_the_head_is_scored_with_the_cap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, final_logit_softcapping=0.5,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits large enough for the cap to bite
    _, ids, mask, rows, cols = batch(2)
    expected = reference_logps(model, ids, mask, rows, cols)
    torch.testing.assert_close(token_logps(model, ids, mask, rows, cols), expected, rtol=1e-5, atol=1e-5)
    # the cap matters here: without it the log-probabilities are far apart
    model.config.final_logit_softcapping = None
    assert (reference_logps(model, ids, mask, rows, cols) - expected).abs().max() > 0.1


def test_a_peft_wrapped_model_is_scored_through_its_base_models_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    _, ids, mask, rows, cols = batch(3)
    torch.testing.assert_close(
        token_logps(model, ids, mask, rows, cols), reference_logps(model, ids, mask, rows, cols), rtol=1e-5, atol=1e-5
    )


def test_sequence_sums_and_the_labelled_loss_equal_the_full_logit_computation():
    model = tiny_llama()
    seqs, ids, mask, _, _ = batch(4)
    starts = [4, 5, 2]  # the second continuation is empty: it scores 0.0
    pairs = [(s[:f], s[f:]) for s, f in zip(seqs, starts, strict=True)]
    expected = []
    for s, f in zip(seqs, starts, strict=True):
        r = torch.zeros(len(s) - f, dtype=torch.long)
        c = torch.arange(f, len(s))
        one_ids, one_mask = right_padded([s], 0)
        expected.append(float(reference_logps(model, one_ids, one_mask, r, c).sum()) if len(c) else 0.0)
    assert sequence_logps(model, 0, pairs, batch_size=2) == pytest.approx(expected, abs=1e-4)
    tokens = [(s, [-100] * f + s[f:]) for s, f in zip(seqs, starts, strict=True)]
    assert token_loss(model, tokens, 0, batch_size=3) == pytest.approx(-sum(expected) / (9 - 4 + 0 + 12 - 2), rel=1e-5)

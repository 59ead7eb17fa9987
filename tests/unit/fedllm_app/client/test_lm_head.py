"""TRL's fused LM head under fedllm's trainer setting: on the CPU it scores only the positions with a label.

A tiny random Llama (built here, instantly) gets TRL 1.16's fused head as its trainers add it; torch's profiler
records the rows of each LM-head product.
"""

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from fedllm_app.client.trainer import score_labelled_positions_only

HIDDEN, VOCAB = 16, 96  # the vocabulary differs from every other layer's width, so the head's products stand out


@pytest.fixture
def fused_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


@pytest.fixture
def trl_default(monkeypatch):
    """TRL's own choice of positions restored for the test, and again after it."""
    original = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_use_triton", original)


def head_rows(model, input_ids, labels):
    """The fused forward's output and the rows of each product against the LM head's weight."""
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof,
    ):
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    rows = [
        e.input_shapes[0][0] for e in prof.events() if e.name == "aten::mm" and e.input_shapes[1] == [HIDDEN, VOCAB]
    ]
    return out, rows


def test_the_fused_lm_head_scores_only_labelled_positions_on_the_cpu(fused_model, trl_default):
    input_ids = torch.randint(0, VOCAB, (4, 20))
    labels = torch.full_like(input_ids, -100)
    labels[:, 15:] = input_ids[:, 15:]  # a prompt of 15 tokens, a completion of 5 (4 predicted after the shift)
    full, full_rows = head_rows(fused_model, input_ids, labels)
    assert sum(full_rows) == 4 * 19  # TRL's default on the CPU: every position

    assert score_labelled_positions_only()
    compact, compact_rows = head_rows(fused_model, input_ids, labels)
    assert sum(compact_rows) == int((labels[:, 1:] != -100).sum()) == 4 * 5
    for field in ("log_probs", "entropy", "mean_logits", "is_top1"):
        torch.testing.assert_close(getattr(compact, field), getattr(full, field), msg=field)
    torch.testing.assert_close(compact.loss, full.loss)


def test_scoring_only_labelled_positions_is_set_once_per_process(trl_default):
    assert score_labelled_positions_only() and score_labelled_positions_only()
    assert not getattr(trl_utils._use_triton.__wrapped__, "scores_labelled_only", False)

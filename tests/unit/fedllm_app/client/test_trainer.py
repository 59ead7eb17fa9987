"""Client training on the tiny model: weights change, seeds reproduce, loss mask is response-only."""

import numpy as np
import pytest

from fedllm_app.client.trainer import client_trainer
from fedllm_app.config import TEMPLATE_NAMES, load_config
from fedllm_app.data.pipeline import partition
from fedllm_app.data.sampling import round_indices
from fedllm_app.data.synthetic import DOMAINS
from fedllm_app.model import get_adapter, get_model, load_count, set_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config({"overrides": "training.max_steps=5"})
    model, tokenizer = get_model(cfg.model, cfg.seed)
    return cfg, model, tokenizer


def _one_round(cfg, model, tokenizer, start, rnd=1, pid=0):
    set_adapter(model, start)
    trainer = client_trainer(model, tokenizer, partition(cfg, pid), cfg, key=f"test-{pid}-{cfg.training.template}")
    result = trainer.train_round(round_indices(len(trainer.dataset), cfg, rnd, pid), 5e-3, seed=rnd)
    return result, get_adapter(model)


def test_training_changes_every_lora_matrix(tiny):
    cfg, model, tok = tiny
    start = get_adapter(model)
    result, after = _one_round(cfg, model, tok, start)
    assert result.steps == 5 and result.num_examples == 5 * cfg.training.batch_size
    assert np.isfinite(result.loss)
    changed = [k for k in start if not np.allclose(start[k], after[k])]
    assert "lora_B" in " ".join(changed) and "lora_A" in " ".join(changed)
    assert len(changed) == len(start)


def test_same_seed_gives_the_same_adapter(tiny):
    cfg, model, tok = tiny
    start = get_adapter(model)
    _, a = _one_round(cfg, model, tok, start, rnd=3)
    _, b = _one_round(cfg, model, tok, start, rnd=3)
    _, c = _one_round(cfg, model, tok, start, rnd=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_base_model_is_loaded_once_per_process(tiny):
    cfg, model, tok = tiny
    before = load_count()
    again, _ = get_model(cfg.model, cfg.seed)
    assert again is model and load_count() == before


def test_set_adapter_rejects_wrong_names_and_shapes(tiny):
    _, model, _ = tiny
    arrays = get_adapter(model)
    key = next(iter(arrays))
    with pytest.raises(ValueError, match="shape"):
        set_adapter(model, {**arrays, key: np.zeros((1, 1), dtype=np.float32)})
    with pytest.raises(ValueError, match="missing"):
        set_adapter(model, {k: v for k, v in arrays.items() if k != key})


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_loss_mask_covers_only_the_response(tiny, template):
    cfg, model, tok = tiny
    # alpaca and vicuna preambles are ~150 bytes: byte-level tokens need a longer max_length.
    cfg = load_config({"overrides": f"training.template={template} training.max_length=256"})
    rows = partition(cfg, 1)[:8]
    data = client_trainer(model, tok, rows, cfg, key=f"mask-{template}").dataset
    assert len(data) == len(rows)
    for row, ex in zip(rows, data, strict=False):
        # TRL stores the loss mask as labels: -100 on every token that carries no loss.
        ids, mask = ex["input_ids"], [label != -100 for label in ex["labels"]]
        masked = tok.decode([i for i, m in zip(ids, mask, strict=False) if m])
        assert masked.startswith(row["response"])
        assert masked.replace(tok.eos_token, "").strip() == row["response"]
        prompt = tok.decode([i for i, m in zip(ids, mask, strict=False) if not m])
        assert row["instruction"] in prompt and row["response"] not in prompt.split(row["instruction"])[-1]
        assert row["domain"] in DOMAINS


def test_rows_longer_than_max_length_are_counted_not_silently_dropped(tiny, caplog):
    cfg, model, tok = tiny
    cfg = load_config({"overrides": "training.template=alpaca training.max_length=40"})
    rows = partition(cfg, 0)[:10]
    with pytest.raises(ValueError, match="no row fits training.max_length=40"):
        client_trainer(model, tok, rows, cfg, key="too-long")
    cfg = load_config({"overrides": "training.template=chat training.max_length=48"})
    long_rows = [{**rows[0], "instruction": "x" * 200}] + rows[1:4]
    data = client_trainer(model, tok, long_rows, cfg, key="some-too-long").dataset
    assert len(data) == 3
    assert "1 of 4 rows dropped" in caplog.text


def test_a_reused_trainer_trains_exactly_like_a_fresh_one(tiny):
    """No optimizer state or seed carries over between rounds of one ClientTrainer."""
    cfg, model, tok = tiny
    start = get_adapter(model)
    rows = partition(cfg, 2)
    reused = client_trainer(model, tok, rows, cfg, key="reuse-a")
    set_adapter(model, start)
    reused.train_round(round_indices(len(reused.dataset), cfg, 1, 2), 5e-3, seed=1)
    set_adapter(model, start)
    reused.train_round(round_indices(len(reused.dataset), cfg, 2, 2), 1e-3, seed=2)
    after_reuse = get_adapter(model)
    fresh = client_trainer(model, tok, rows, cfg, key="reuse-b")
    set_adapter(model, start)
    fresh.train_round(round_indices(len(fresh.dataset), cfg, 2, 2), 1e-3, seed=2)
    after_fresh = get_adapter(model)
    assert all(np.array_equal(after_reuse[k], after_fresh[k]) for k in start)


def test_skipping_the_per_step_flop_count_leaves_the_trained_adapter_unchanged(tiny, monkeypatch):
    from fedllm_app.client import trainer as trainer_module

    cfg, model, tok = tiny
    start, rows = get_adapter(model), partition(cfg, 3)
    lean = client_trainer(model, tok, rows, cfg, key="flops-skipped")
    set_adapter(model, start)
    lean.train_round(round_indices(len(lean.dataset), cfg, 1, 3), 5e-3, seed=1)
    after_lean = get_adapter(model)
    monkeypatch.setattr(trainer_module, "without_flop_count", lambda trainer_class: trainer_class)
    counted = client_trainer(model, tok, rows, cfg, key="flops-counted")
    set_adapter(model, start)
    counted.train_round(round_indices(len(counted.dataset), cfg, 1, 3), 5e-3, seed=1)
    assert lean.trainer.state.total_flos == 0 and counted.trainer.state.total_flos > 0
    assert all(np.array_equal(after_lean[k], get_adapter(model)[k]) for k in start)


def test_scoring_only_labelled_positions_gives_the_same_sft_loss_and_gradients(tiny, monkeypatch):
    """Up to float rounding: the backward's products over fewer rows may round differently (AdamW can then
    amplify a last-bit difference in a near-zero gradient, so trained adapters are not compared bit for bit)."""
    import torch
    import trl.trainer.utils as trl_utils

    cfg, model, tok = tiny
    trainer = client_trainer(model, tok, partition(cfg, 1)[:16], cfg, key="sft-lm-head").trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])

    def loss_and_grads():
        model.eval()  # no dropout: both passes see the same network
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert trl_utils._use_triton(torch.device("cpu"))  # the trainer scores labelled positions only
    compact = loss_and_grads()
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton.__wrapped__)  # TRL's default: all of them
    full = loss_and_grads()
    model.zero_grad()
    model.train()
    assert torch.equal(compact[0], full[0])
    assert any(g.abs().sum() > 0 for g in full[1].values())
    for name, grad in full[1].items():
        torch.testing.assert_close(compact[1][name], grad, rtol=1e-4, atol=1e-8, msg=name)

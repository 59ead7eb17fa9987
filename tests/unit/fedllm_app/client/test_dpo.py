"""Federated DPO: the built-in preference pairs, the DPO metrics, and DPO on the shared client training path
(TRL's DPOTrainer, a frozen reference, FedProx and SCAFFOLD terms, starting from an SFT adapter).
"""

import math

import numpy as np
import pytest
import torch

from evaluation import preferences
from fedllm_app.client.trainer import client_trainer
from fedllm_app.config import ConfigError, load_config
from fedllm_app.data import pairs, synthetic
from fedllm_app.data import pipeline as data
from fedllm_app.data.sampling import round_indices
from fedllm_app.model import get_adapter, get_model, set_adapter

DPO = "task=dpo training.max_steps=3 training.batch_size=8"


def test_builtin_pairs_prefer_the_correct_answer():
    rows = [r.as_dict() for r in synthetic.generate(30, seed=0)]
    made = pairs.make_pairs(rows, seed=0)
    assert made == pairs.make_pairs(rows, seed=0)
    for row, pair in zip(rows, made, strict=True):
        assert pair["prompt"] == [{"role": "user", "content": row["instruction"]}]
        assert pair["chosen"] == row["response"] and pair["rejected"] != row["response"]
        assert pair["domain"] == row["domain"]
        if row["domain"] == "sentiment":
            assert {pair["chosen"], pair["rejected"]} == {"positive", "negative"}
        if row["domain"] == "arithmetic":
            assert abs(int(pair["rejected"]) - int(pair["chosen"])) == 1


def test_task_dpo_turns_the_default_dataset_into_pairs():
    cfg = load_config({"overrides": "task=dpo"})
    part, test = data.partition(cfg, 0), data.heldout(cfg)
    assert len(part) == 798 and len(test) == 200
    assert {"prompt", "chosen", "rejected", "domain"} <= set(part[0])


def test_dpo_scores_by_hand():
    policy = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0]))
    reference = (torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    s = preferences.dpo_scores(policy, reference, beta=0.5)
    assert s["reward_chosen"].tolist() == [0.5, 0.0] and s["reward_rejected"].tolist() == [-0.5, 0.0]
    assert s["margin"].tolist() == [1.0, 0.0]
    assert s["loss"].tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)])
    rows = [{"domain": "a"}, {"domain": "b"}]
    m = preferences.preference_metrics(policy, reference, rows, beta=0.5)
    assert m["preference_accuracy"] == 0.5 and m["accuracy/a"] == 1.0 and m["accuracy/b"] == 0.0  # a tie is wrong
    assert m["reward_margin"] == 0.5 and m["dpo_loss"] == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)


def test_bad_beta_fails_at_config_time():
    with pytest.raises(ConfigError, match=r"task.beta=0 must be positive"):
        load_config({"overrides": "task=dpo task.beta=0"})


@pytest.fixture(scope="module")
def tiny_dpo():
    cfg = load_config({"overrides": DPO})
    model, tok = get_model(cfg.model, cfg.seed)
    return cfg, model, tok


def ref_arrays(model):
    from peft import get_peft_model_state_dict

    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model, adapter_name="ref").items()}


@pytest.mark.slow
def test_dpo_round_trains_the_adapter_against_a_frozen_reference(tiny_dpo):
    cfg, model, tok = tiny_dpo
    start = get_adapter(model)
    trainer = client_trainer(model, tok, data.partition(cfg, 0)[:64], cfg, key="dpo-0")
    assert not any(".ref." in n for n, p in model.named_parameters() if p.requires_grad)
    set_adapter(model, start)
    result = trainer.train_round(round_indices(len(trainer.dataset), cfg, 1, 0), 5e-3, seed=1)
    assert result.steps == 3 and np.isfinite(result.loss) and result.num_examples == 24
    after = get_adapter(model)
    assert all(not np.allclose(start[k], after[k]) for k in start if "lora_B" in k)
    # The reference is the starting point (zeros = the base model with the adapter disabled), untouched by training.
    assert all(np.abs(v).max() == 0 for v in ref_arrays(model).values())


@pytest.mark.slow
def test_heldout_preference_metrics_start_neutral_and_move_with_training(tiny_dpo):
    cfg, model, tok = tiny_dpo
    rows = data.heldout(cfg)[:40]
    # A fresh LoRA: B = 0, so the model equals the reference (the base with the adapter disabled).
    fresh = {k: v if "lora_A" in k else np.zeros_like(v) for k, v in get_adapter(model).items()}
    ev = preferences.HeldoutPreferences(model, tok, rows, cfg)
    set_adapter(model, fresh)
    first = ev.evaluate(model)
    assert first["reward_margin"] == 0 and first["dpo_loss"] == pytest.approx(math.log(2))
    assert first["preference_accuracy"] == 0  # every pair is a tie
    trainer = client_trainer(model, tok, data.pooled(cfg)[::10], cfg, key="dpo-pooled")
    for rnd in (1, 2, 3):
        trainer.train_round(round_indices(len(trainer.dataset), cfg, rnd, 0), 5e-3, seed=rnd)
    later = ev.evaluate(model)
    assert later["reward_margin"] > 0.05 and later["dpo_loss"] < math.log(2)
    assert later["preference_accuracy"] > 0.5


@pytest.mark.slow
def test_fedprox_and_scaffold_terms_act_on_dpo_gradients(tiny_dpo):
    cfg, model, tok = tiny_dpo
    start = get_adapter(model)
    trainer = client_trainer(model, tok, data.partition(cfg, 1)[:64], cfg, key="dpo-1")
    idx = round_indices(len(trainer.dataset), cfg, 1, 1)

    def run(**kw):
        set_adapter(model, start)
        trainer.train_round(idx, 5e-3, seed=1, **kw)
        return get_adapter(model)

    plain, again = run(), run()
    prox = run(mu=50.0)
    correction = {k: np.full_like(v, 0.05) for k, v in start.items()}
    scaffold = run(correction=correction)
    assert all(np.array_equal(plain[k], again[k]) for k in plain)
    dist = lambda a: sum(float(np.sum((a[k] - start[k]) ** 2)) for k in start)  # noqa: E731
    assert dist(prox) < dist(plain), "FedProx must pull the DPO update towards the global adapter"
    assert any(not np.allclose(scaffold[k], plain[k]) for k in plain)
    assert trainer.terms.steps == 3 and set(trainer.terms.mean_gradient()) == set(start)


@pytest.mark.slow
def test_dpo_starts_from_an_sft_adapter_which_is_also_the_reference(tiny_dpo, tmp_path):
    cfg, model, tok = tiny_dpo
    sft = {
        k: np.random.default_rng(0).normal(0, 0.02, v.shape).astype(np.float32) for k, v in get_adapter(model).items()
    }
    set_adapter(model, sft)
    model.save_pretrained(tmp_path / "sft")
    cfg2 = load_config({"overrides": f"{DPO} model.adapter={tmp_path / 'sft'}"})
    model2, tok2 = get_model(cfg2.model, cfg2.seed)
    assert model2 is not model
    assert all(np.allclose(get_adapter(model2)[k], sft[k]) for k in sft)
    client_trainer(model2, tok2, data.partition(cfg2, 0)[:32], cfg2, key="dpo-from-sft")
    ref = ref_arrays(model2)
    assert set(ref) == set(sft) and all(np.allclose(ref[k], sft[k]) for k in sft)
    with pytest.raises(ConfigError, match=r"model.adapter='/nope' is not a directory"):
        load_config({"overrides": "task=dpo model.adapter=/nope"})


@pytest.mark.slow
def test_dpo_rows_too_long_are_counted_dropped_or_truncated(tiny_dpo, caplog):
    cfg, model, tok = tiny_dpo
    cfg = load_config({"overrides": f"{DPO} training.max_length=48"})
    rows = [r for r in data.partition(cfg, 2) if r["domain"] == "arithmetic"][:4]  # short prompts
    rows[0] = {**rows[0], "prompt": [{"role": "user", "content": "x" * 60}]}
    rows[1] = {**rows[1], "prompt": [{"role": "user", "content": "y" * 30}], "chosen": "z" * 20}
    trainer = client_trainer(model, tok, rows, cfg, key="dpo-long")
    out = caplog.text
    assert len(trainer.dataset) == 3 and trainer.dropped == 1 and trainer.truncated == 1
    assert "1 of 4 rows dropped: prompt longer than training.max_length=48" in out
    assert "1 of 4 rows truncated to training.max_length=48 tokens" in out


@pytest.mark.slow
def test_scoring_only_labelled_positions_leaves_the_trained_dpo_adapter_unchanged(tiny_dpo, monkeypatch):
    import trl.trainer.utils as trl_utils

    cfg, model, tok = tiny_dpo
    start = get_adapter(model)
    trainer = client_trainer(model, tok, data.partition(cfg, 3)[:64], cfg, key="dpo-lm-head")
    idx = round_indices(len(trainer.dataset), cfg, 1, 3)

    def run():
        set_adapter(model, start)
        trainer.train_round(idx, 5e-3, seed=1)
        return get_adapter(model)

    assert trl_utils._use_triton(torch.device("cpu"))  # the trainer scores labelled positions only
    compact = run()
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton.__wrapped__)  # TRL's default: all of them
    full = run()
    assert all(np.array_equal(compact[k], full[k]) for k in start)
    assert any(not np.array_equal(start[k], full[k]) for k in start)

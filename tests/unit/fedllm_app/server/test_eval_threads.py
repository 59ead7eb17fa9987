"""The server's evaluation uses every core while the clients wait, and scores held-out rows tokenised once."""

import os

import pytest
import torch
from omegaconf import OmegaConf

import evaluation.heldout as heldout_module
import evaluation.preferences as preferences_module
from fedllm_app.config import ConfigError, load_config
from fedllm_app.data.pipeline import heldout
from fedllm_app.model import get_adapter, get_model, set_adapter
from fedllm_app.server.run import eval_threads


@pytest.fixture
def one_thread():
    """The ServerApp's own thread count (training.num_threads=1) for the test; the process's comes back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_evaluation_gets_every_core_by_default_and_the_servers_own_thread_count_comes_back(one_thread):
    seen = []
    with eval_threads(OmegaConf.create({"eval": {"num_threads": 0}})):
        seen.append(torch.get_num_threads())
    assert seen == [len(os.sched_getaffinity(0))]
    with eval_threads(OmegaConf.create({"eval": {"num_threads": 3}})):
        seen.append(torch.get_num_threads())
    assert seen[-1] == 3 and torch.get_num_threads() == 1


def test_a_negative_thread_count_is_refused_with_the_setting_named():
    with pytest.raises(ConfigError, match=r"eval\.num_threads=-1 must be >= 0"):
        with eval_threads(OmegaConf.create({"eval": {"num_threads": -1}})):
            pass


def counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_held_out_rows_are_tokenised_once_and_every_rounds_loss_is_the_same_for_the_same_adapter(monkeypatch):
    cfg = load_config({"overrides": "dataset.test_per_domain=2"})
    model, tok = get_model(cfg.model, cfg.seed)
    calls = counting(monkeypatch, heldout_module, "sft_token_ids")
    rows = heldout(cfg)
    scorer = heldout_module.HeldoutRows(tok, rows, cfg.training)
    assert len(calls) == len(rows)
    first, second = scorer.evaluate(model, exact=False), scorer.evaluate(model, exact=False)
    assert len(calls) == len(rows), "a round tokenised the held-out rows again"
    assert first == second and first["eval_loss"] > 0


def test_held_out_pairs_are_tokenised_once(monkeypatch):
    cfg = load_config({"overrides": "task=dpo dataset.test_per_domain=2"})
    model, tok = get_model(cfg.model, cfg.seed)
    calls = counting(monkeypatch, preferences_module, "pair_token_ids")
    rows = heldout(cfg)
    before = get_adapter(model)  # the process's cached model: put its adapter back for the tests after this one
    try:
        scorer = preferences_module.HeldoutPreferences(model, tok, rows, cfg)
        assert len(calls) == len(rows)
        metrics = scorer.evaluate(model)
    finally:
        set_adapter(model, before)
    assert len(calls) == len(rows), "a round tokenised the held-out pairs again"
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the adapter is still the reference

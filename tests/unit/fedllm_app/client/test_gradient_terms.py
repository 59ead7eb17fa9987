"""FedProx and SCAFFOLD terms on the gradients, and their effect on real tiny-model training."""

import numpy as np
import pytest
import torch

from fedllm_app.client.gradient_terms import GradientTerms, ScaffoldClient, adapter_key
from fedllm_app.client.trainer import client_trainer
from fedllm_app.config import load_config
from fedllm_app.data.pipeline import partition
from fedllm_app.data.sampling import round_indices
from fedllm_app.model import get_adapter, get_model, set_adapter
from strategies.records import to_record
from strategies.scaffold import C_CLIENT_KEY, C_SERVER_KEY


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)


def test_terms_add_proximal_gradient_and_correction_before_the_step():
    model = Tiny()
    terms = GradientTerms()
    terms.start_round(model, mu=0.5, correction={"w": np.array([0.1, -0.1], dtype=np.float32)})
    with torch.no_grad():
        model.w += torch.tensor([0.4, -0.2])  # drift away from the round-start anchor
    model.w.grad = torch.tensor([1.0, 1.0])
    terms.callback().on_pre_optimizer_step(None, None, None)
    torch.testing.assert_close(model.w.grad, torch.tensor([1.0 + 0.5 * 0.4 + 0.1, 1.0 - 0.5 * 0.2 - 0.1]))


def test_raw_gradients_are_averaged_for_scaffold():
    model = Tiny()
    terms = GradientTerms()
    terms.start_round(model, correction={"w": np.array([1.0, 1.0], dtype=np.float32)})
    for g in ([1.0, 2.0], [3.0, 0.0]):
        model.w.grad = torch.tensor(g)
        terms.apply()
    np.testing.assert_allclose(terms.mean_gradient()["w"], [2.0, 1.0])  # raw, without the +1 correction


def test_a_scaffold_round_without_an_optimizer_step_fails_saying_why():
    terms = GradientTerms()
    terms.start_round(Tiny(), correction={"w": np.zeros(2, dtype=np.float32)})
    message = "no optimizer step was taken this round; SCAFFOLD cannot update its control variate"
    with pytest.raises(ValueError, match=f"^{message}$"):
        terms.mean_gradient()


def scaffold_message(c: dict, c_i: dict):
    return type("Msg", (), {"content": {C_SERVER_KEY: to_record(c), C_CLIENT_KEY: to_record(c_i)}})()


def test_scaffold_client_corrects_by_c_minus_its_own_c_i_and_replies_the_change_of_c_i():
    c, c_i = {"w": np.array([0.3, -0.2], np.float32)}, {"w": np.array([0.1, 0.4], np.float32)}
    client = ScaffoldClient.from_message(scaffold_message(c, c_i))
    np.testing.assert_allclose(client.correction()["w"], [0.2, -0.6])
    model, terms = Tiny(), GradientTerms()
    terms.start_round(model, correction=client.correction())
    model.w.grad = torch.tensor([1.0, 1.0])
    terms.apply()
    torch.testing.assert_close(model.w.grad, torch.tensor([1.2, 0.4]))
    dc = client.finish(terms.mean_gradient())
    np.testing.assert_allclose(dc["w"].numpy(), [1.0 - 0.1, 1.0 - 0.4])  # c_i+ (the raw mean gradient) - c_i


def test_scaffold_client_without_its_c_i_fails_naming_the_fix():
    msg = type("Msg", (), {"content": {C_SERVER_KEY: to_record({"w": np.zeros(2, np.float32)})}})()
    with pytest.raises(ValueError, match="no 'c-client'.*same fedllm version on the server and the clients$"):
        ScaffoldClient.from_message(msg)
    assert ScaffoldClient.from_message(type("Msg", (), {"content": {}})()) is None


def test_no_terms_leave_gradients_alone():
    model = Tiny()
    terms = GradientTerms()
    terms.start_round(model)
    model.w.grad = torch.tensor([1.0, 2.0])
    terms.callback().on_pre_optimizer_step(None, None, None)
    torch.testing.assert_close(model.w.grad, torch.tensor([1.0, 2.0]))


def test_adapter_key_drops_the_adapter_name():
    assert adapter_key("base_model.model.x.q_proj.lora_A.default.weight") == "base_model.model.x.q_proj.lora_A.weight"


def test_terms_before_any_round_hold_no_parameters_and_no_term():
    terms = GradientTerms()
    assert (terms.params, terms.anchor, terms.mu, terms.correction, terms.ranks) == ({}, {}, 0.0, None, None)


def test_a_round_without_fedprox_neither_pulls_the_parameters_back_nor_keeps_a_copy_of_them():
    model, terms = Tiny(), GradientTerms()
    terms.start_round(model)
    with torch.no_grad():
        model.w += torch.tensor([0.4, -0.2])  # drift that a proximal term would pull back
    model.w.grad = torch.tensor([1.0, 1.0])
    terms.apply()
    torch.testing.assert_close(model.w.grad, torch.tensor([1.0, 1.0]))
    assert terms.anchor == {}


def test_a_round_without_scaffold_averages_no_gradients():
    model, terms = Tiny(), GradientTerms()
    terms.start_round(model, mu=0.5)
    model.w.grad = torch.tensor([1.0, 2.0])
    terms.apply()
    assert terms.mean_gradient() == {}


def test_the_scaffold_correction_is_moved_to_the_device_of_the_parameters():
    model, terms = Tiny().to("meta"), GradientTerms()  # the meta device stands in for an accelerator
    terms.start_round(model, correction={"w": np.array([0.1, -0.1], dtype=np.float32)})
    assert terms.correction["w"].device == torch.device("meta")


def test_the_mean_gradient_of_a_half_precision_model_is_summed_and_returned_in_float32():
    """2048 + 1 is 2048 in float16 (its spacing there is 2); the float32 sum keeps the 1."""
    model, terms = Tiny().half(), GradientTerms()
    terms.start_round(model, correction={"w": np.zeros(2, dtype=np.float16)})
    for g in ([2048.0, 0.0], [1.0, 0.0]):
        model.w.grad = torch.tensor(g, dtype=torch.float16)
        terms.apply()
    mean = terms.mean_gradient()["w"]
    assert mean.dtype == np.float32
    np.testing.assert_array_equal(mean, [1024.5, 0.0])


@pytest.mark.slow
def test_fedprox_keeps_the_adapter_near_the_global_and_scaffold_corrects_it():
    cfg = load_config({"overrides": "training.max_steps=10"})
    model, tok = get_model(cfg.model, cfg.seed)
    start = get_adapter(model)
    trainer = client_trainer(model, tok, partition(cfg, 1), cfg, key="terms-1")
    idx = round_indices(len(trainer.dataset), cfg, 1, 1)

    def run(**kw):
        set_adapter(model, start)
        result = trainer.train_round(idx, 5e-3, seed=1, **kw)
        after = get_adapter(model)
        return result, after, sum(float(((after[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    _, plain, dist_plain = run()
    _, _, dist_prox = run(mu=50.0)
    assert dist_prox < 0.9 * dist_plain

    c = {k: np.full_like(v, 0.05) for k, v in start.items()}
    c_i = {k: np.full_like(v, -0.02) for k, v in start.items()}
    scaffold = ScaffoldClient.from_message(scaffold_message(c, c_i))
    _, corrected, _ = run(correction=scaffold.correction())
    assert any(not np.allclose(corrected[k], plain[k]) for k in start)
    mean_grad = trainer.terms.mean_gradient()
    assert set(mean_grad) == set(start)
    assert trainer.terms.steps == 10
    dc = scaffold.finish(mean_grad)
    key = next(k for k in start if "lora_B" in k)
    assert np.abs(mean_grad[key]).max() > 0
    np.testing.assert_allclose(dc[key].numpy(), mean_grad[key] + 0.02, rtol=1e-6)  # c_i+ - c_i
    set_adapter(model, start)  # the process's cached model is shared with other tests

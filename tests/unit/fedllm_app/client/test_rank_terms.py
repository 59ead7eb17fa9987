"""HetLoRA's self-pruning on the gradients: the tail regulariser's gradient on a hand-computed example, and the
ranks a pruned client no longer trains."""

import pytest
import torch

from fedllm_app.client.gradient_terms import GradientTerms, RankTerms, tail_norm_grads


def test_the_tail_regularisers_gradient_matches_the_hand_computed_one():
    # r = 2, keep = 1: the tail is A's row 1 (0, 2) and B's column 1 (0, 1)^T; P = B_t A_t = [[0, 0], [0, 2]],
    # ||P|| = 2 = |a b| for the one non-zero pair (a = 2, b = 1): d/da = w b = 0.5, d/db = w a = 1.0 (w = 0.5).
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    grad_a, grad_b = tail_norm_grads(a, b, keep=1, weight=0.5)
    torch.testing.assert_close(grad_a, torch.tensor([[0.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(grad_b, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_a_tail_product_of_norm_below_one_still_gets_its_gradient():
    # The tail: A's row 1 (0, 0.2), B's column 1 (0, 0.5)^T; P = [[0, 0], [0, 0.1]], ||P|| = 0.1:
    # d/da = w b = 0.25, d/db = w a = 0.1 (w = 0.5).
    a = torch.tensor([[1.0, 0.0], [0.0, 0.2]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    grad_a, grad_b = tail_norm_grads(a, b, keep=1, weight=0.5)
    torch.testing.assert_close(grad_a, torch.tensor([[0.0, 0.0], [0.0, 0.25]]))
    torch.testing.assert_close(grad_b, torch.tensor([[0.0, 0.0], [0.0, 0.1]]))


def test_the_tail_regularisers_gradient_is_autograds_of_the_norm_of_the_tail_product():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    (0.3 * torch.linalg.matrix_norm(b[:, 2:] @ a[2:])).backward()
    grad_a, grad_b = tail_norm_grads(a, b, keep=2, weight=0.3)
    torch.testing.assert_close(grad_a, a.grad)
    torch.testing.assert_close(grad_b, b.grad)


def test_a_zero_tail_product_gets_no_gradient():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # B's tail column is zero: P = 0
    grad_a, grad_b = tail_norm_grads(a, b, keep=1, weight=0.5)
    assert not grad_a.any() and not grad_b.any()


class Layer(torch.nn.Module):
    """One LoRA pair, named as PEFT names it, of rank 3."""

    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 3, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(3, 2, bias=False)})


def test_terms_add_the_regulariser_on_the_trained_tail_and_zero_the_ranks_not_trained():
    layer = Layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]))
        b.copy_(torch.tensor([[1.0, 0.0, 7.0], [0.0, 1.0, 7.0]]))
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    terms = GradientTerms()
    terms.start_round(layer, ranks=RankTerms(active=2, keep=1, weight=0.5))  # trains ranks 0-1; rank 2 is pruned
    terms.callback().on_pre_optimizer_step(None, None, None)
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, 1.0], [1.0, 1.5], [0.0, 0.0]]))
    torch.testing.assert_close(b.grad, torch.tensor([[1.0, 1.0, 0.0], [1.0, 2.0, 0.0]]))


@pytest.mark.parametrize("ranks", [None, RankTerms(active=3, keep=3, weight=0.5), RankTerms(3, 1, 0.0)])
def test_without_a_tail_or_a_weight_the_gradients_are_unchanged(ranks):
    layer = Layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    terms = GradientTerms()
    terms.start_round(layer, ranks=ranks)
    terms.callback().on_pre_optimizer_step(None, None, None)
    assert torch.equal(a.grad, torch.ones_like(a)) and torch.equal(b.grad, torch.ones_like(b))
